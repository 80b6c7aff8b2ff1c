// Shared pieces of the CUDA backend: dtype codes and conversions, 128-bit packs, row layouts, error checks,
// the device guard and deterministic reductions. No PyTorch header anywhere: tensors arrive as raw pointers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "ops.h"

namespace vk {

// dtype codes shared with vaekernels/cuda/__init__.py (_DTYPES).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

constexpr unsigned kFullMask = 0xffffffffu;

[[noreturn]] inline void fail(const char* op, const std::string& what) {
  throw std::runtime_error(std::string("vaekernels._C.") + op + ": " + what);
}

inline void check(cudaError_t err, const char* op) {
  if (err != cudaSuccess) fail(op, std::string(cudaGetErrorString(err)) + " (" + cudaGetErrorName(err) + ")");
}

// Called after every launch: a bad configuration or an earlier asynchronous fault surfaces here.
inline void check_launch(const char* op) { check(cudaGetLastError(), op); }

// Makes `device` current for the launches of one call and restores the caller's device afterwards
// (PyTorch reads the current device from the runtime, so it must not change behind its back).
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* op) {
    check(cudaGetDevice(&previous_), op);
    if (previous_ != device) check(cudaSetDevice(device), op);
  }
  ~DeviceGuard() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

// Multiprocessor count of a device, cached (grid sizes, and therefore reduction orders, depend only on it).
inline int sm_count(int device, const char* op) {
  static std::atomic<int> cache[64];
  const bool cached = device >= 0 && device < 64;
  int value = cached ? cache[device].load(std::memory_order_relaxed) : 0;
  if (value == 0) {
    check(cudaDeviceGetAttribute(&value, cudaDevAttrMultiProcessorCount, device), op);
    if (cached) cache[device].store(value, std::memory_order_relaxed);
  }
  return value;
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline size_t align_up(size_t n) { return (n + 255) & ~static_cast<size_t>(255); }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }
inline int pow2_ceil(int64_t n) {
  int p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Runs f(T{}) with T the storage type of a dtype code.
template <typename F>
void dispatch(int dtype, const char* op, F&& f) {
  switch (dtype) {
    case kF32: f(float{}); break;
    case kF16: f(__half{}); break;
    case kBF16: f(__nv_bfloat16{}); break;
    default: fail(op, "unsupported dtype code " + std::to_string(dtype));
  }
}

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// One element of a tensor whose dtype is known only at run time (codebooks, 0-d scalars, weights).
__device__ __forceinline__ float load_any(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case kF16: return __half2float(static_cast<const __half*>(p)[i]);
    case kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

// V consecutive elements: one 128-bit access when V * sizeof(T) == 16 (the caller checked the alignment).
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <typename T, int V>
__device__ __forceinline__ void load_pack(const void* p, int64_t i, float (&out)[V]) {
  const Pack<T, V> pk = *reinterpret_cast<const Pack<T, V>*>(static_cast<const T*>(p) + i);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_f(pk.v[j]);
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(void* p, int64_t i, const float (&in)[V]) {
  Pack<T, V> pk;
#pragma unroll
  for (int j = 0; j < V; ++j) pk.v[j] = from_f<T>(in[j]);
  *reinterpret_cast<Pack<T, V>*>(static_cast<T*>(p) + i) = pk;
}

// Where row n (of the (N, D) rows view of a tensor along its channel axis) starts, and the channel stride:
// offset(n, d) = (n / inner) * s_outer + (n % inner) * s_inner + d * s_d, in elements.
// Channel-last rows have inner = 1; a contiguous channel-first tensor (A, D, B) has inner = B, s_d = B.
struct RowLayout {
  int64_t inner, s_outer, s_inner, s_d;
  __device__ __forceinline__ int64_t row(int64_t n) const {
    return inner == 1 ? n * s_outer : (n / inner) * s_outer + (n % inner) * s_inner;
  }
};

inline RowLayout row_layout(const Layout& l) { return RowLayout{l[0], l[1], l[2], l[3]}; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// Sum over a block of THREADS threads in a fixed order (the result is valid in thread 0): same input, same bits.
template <int THREADS>
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warps[THREADS / 32];
  v = warp_sum(v);
  if ((threadIdx.x & 31) == 0) warps[threadIdx.x >> 5] = v;
  __syncthreads();
  float t = 0.f;
  if (threadIdx.x < 32) {
    t = threadIdx.x < THREADS / 32 ? warps[threadIdx.x] : 0.f;
    t = warp_sum(t);
  }
  return t;
}

namespace {

// out[j] = scale * sum_p partial[p * M + j] in increasing p: the deterministic second pass of every reduction.
// M == 1 runs as one block of 256 threads (fixed tree), M > 1 as one thread per output.
__global__ void __launch_bounds__(256) reduce_partials(const float* __restrict__ partial, int64_t P, int64_t M,
                                                      float scale, float* __restrict__ out) {
  if (M == 1) {
    float t = 0.f;
    for (int64_t p = threadIdx.x; p < P; p += 256) t += partial[p];
    t = block_sum<256>(t);
    if (threadIdx.x == 0) out[0] = t * scale;
    return;
  }
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 256 + threadIdx.x;
  if (j >= M) return;
  float t = 0.f;
  for (int64_t p = 0; p < P; ++p) t += partial[p * M + j];
  out[j] = t * scale;
}

inline void launch_reduce_partials(const float* partial, int64_t P, int64_t M, float scale, float* out,
                                   cudaStream_t stream, const char* op) {
  const unsigned blocks = M == 1 ? 1u : static_cast<unsigned>(ceil_div(M, 256));
  reduce_partials<<<blocks, 256, 0, stream>>>(partial, P, M, scale, out);
  check_launch(op);
}

}  // namespace
}  // namespace vk
