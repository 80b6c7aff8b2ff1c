// Reparameterization and Gaussian KL: one fused forward pass (z and/or KL) and one fused backward pass.
//
// eps is regenerated from Philox (seed read from device memory, offset = flat index), never stored.
// Elementwise work uses 128-bit packs when every pointer is 16-byte aligned (a scalar tail otherwise).
// KL reductions are deterministic: fixed per-block partial sums, then reduce_partials in a fixed order.
#include <algorithm>

#include "common.cuh"
#include "philox.cuh"

namespace vk {
namespace {

enum KlMode : int { kNone = 0, kElementwise = 1, kSum = 2, kLatent = 3, kSample = 4 };
constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;  // rows each thread visits per column block in the 2-D (latent/sample) kernel

struct FwdArgs {
  const void* mu;
  const void* lv;
  const void* pm;   // prior mean or null
  const void* plv;  // prior log-variance or null
  const int64_t* seed;
  void* z;   // null: no sample
  void* kl;  // the elementwise KL (kl mode "elementwise" only)
  int mode;
  int64_t numel, L;  // L = numel / rows: the row length of the (rows, L) view
};

struct BwdArgs {
  const void* mu;
  const void* lv;
  const void* pm;
  const void* plv;
  const int64_t* seed;
  const void* dz;  // null: no gradient of z (with a seed it also flows to logvar through eps)
  const void* w;   // dkl (null: no KL gradient), broadcast by mode
  int w_dtype;
  int mode;
  int64_t numel, L;
  void* dmu;
  void* dlv;
  void* dpm;
  void* dplv;
};

// KL(N(m, e^lv) || N(pm, e^plv)) of one element, in the reference's order of operations.
__device__ __forceinline__ float kl_elem(float m, float lv, float pm, float plv, bool has_pm, bool has_plv) {
  const float var = expf(lv);
  const float diff = has_pm ? m - pm : m;
  if (!has_plv) return 0.5f * (var + diff * diff - 1.0f - lv);
  const float inv_pvar = expf(-plv);
  return 0.5f * (plv - lv + (var + diff * diff) * inv_pvar - 1.0f);
}

// z and the KL of the V elements from flat index i (kl[] is zero in mode "none").
template <typename T, int V>
__device__ __forceinline__ void fwd_elems(const FwdArgs& a, uint64_t seed, int64_t i, float (&kl)[V]) {
  float m[V], lv[V], pm[V] = {}, plv[V] = {};
  load_pack<T, V>(a.mu, i, m);
  load_pack<T, V>(a.lv, i, lv);
  if (a.pm) load_pack<T, V>(a.pm, i, pm);
  if (a.plv) load_pack<T, V>(a.plv, i, plv);
  if (a.z) {
    float z[V];
#pragma unroll
    for (int j = 0; j < V; ++j) z[j] = m[j] + expf(0.5f * lv[j]) * philox_normal(seed, static_cast<uint64_t>(i + j));
    store_pack<T, V>(a.z, i, z);
  }
#pragma unroll
  for (int j = 0; j < V; ++j) kl[j] = a.mode == kNone ? 0.f : kl_elem(m[j], lv[j], pm[j], plv[j], a.pm, a.plv);
  if (a.mode == kElementwise) store_pack<T, V>(a.kl, i, kl);
}

// Modes none / elementwise / sum over the flat tensor (grid-stride); "sum" leaves one partial per block.
template <typename T, int V>
__global__ void __launch_bounds__(kThreads) fwd_flat(FwdArgs a, float* __restrict__ partial) {
  const uint64_t seed = a.z ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t packs = a.numel / V;
  float acc = 0.f;
  for (int64_t p = t0; p < packs; p += stride) {
    float kl[V];
    fwd_elems<T, V>(a, seed, p * V, kl);
#pragma unroll
    for (int j = 0; j < V; ++j) acc += kl[j];
  }
  for (int64_t i = packs * V + t0; i < a.numel; i += stride) {
    float kl[1];
    fwd_elems<T, 1>(a, seed, i, kl);
    acc += kl[0];
  }
  if (a.mode == kSum) {
    acc = block_sum<kThreads>(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
  }
}

// Modes latent (column sums of the (B, L) view) and sample (row sums), with z when sampling.
// A block covers kRowsPerThread * R rows and, per column block, G threads x V columns (R = 256 / G).
// latent leaves partial[blockIdx.x][L], sample partial[blockIdx.y][B]; both in a fixed order.
template <typename T, bool VEC>
__global__ void __launch_bounds__(kThreads)
    fwd_2d(FwdArgs a, int64_t B, int G, int64_t col_blocks, float* __restrict__ partial) {
  constexpr int V = 16 / sizeof(T), RI = kRowsPerThread;
  __shared__ float s[kThreads * (V > RI ? V : RI)];
  const uint64_t seed = a.z ? static_cast<uint64_t>(*a.seed) : 0;
  const int g = threadIdx.x % G, r = threadIdx.x / G, R = kThreads / G, width = G * V;
  const int64_t L = a.L, row0 = static_cast<int64_t>(blockIdx.x) * R * RI;
  float rowacc[RI] = {};
  for (int64_t cb = blockIdx.y; cb < col_blocks; cb += gridDim.y) {
    const int64_t col = cb * width + static_cast<int64_t>(g) * V;
    float colacc[V] = {};
#pragma unroll
    for (int it = 0; it < RI; ++it) {
      const int64_t row = row0 + static_cast<int64_t>(it) * R + r;
      if (row >= B || col >= L) continue;
      const int64_t i = row * L + col;
      float kl[V];
      if constexpr (VEC) {
        fwd_elems<T, V>(a, seed, i, kl);
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          float one[1] = {0.f};
          if (col + j < L) fwd_elems<T, 1>(a, seed, i + j, one);
          kl[j] = one[0];
        }
      }
#pragma unroll
      for (int j = 0; j < V; ++j) {
        colacc[j] += kl[j];
        rowacc[it] += kl[j];
      }
    }
    if (a.mode == kLatent) {
#pragma unroll
      for (int j = 0; j < V; ++j) s[r * width + g * V + j] = colacc[j];
      __syncthreads();
      for (int c = threadIdx.x; c < width; c += kThreads) {
        const int64_t lc = cb * width + c;
        if (lc >= L) continue;
        float t = 0.f;
        for (int rr = 0; rr < R; ++rr) t += s[rr * width + c];
        partial[static_cast<int64_t>(blockIdx.x) * L + lc] = t;
      }
      __syncthreads();
    }
  }
  if (a.mode == kSample) {
#pragma unroll
    for (int it = 0; it < RI; ++it) s[(it * R + r) * G + g] = rowacc[it];
    __syncthreads();
    for (int t = threadIdx.x; t < R * RI; t += kThreads) {
      const int64_t row = row0 + t;
      if (row >= B) continue;
      float v = 0.f;
      for (int gg = 0; gg < G; ++gg) v += s[t * G + gg];
      partial[static_cast<int64_t>(blockIdx.y) * B + row] = v;
    }
  }
}

// Every gradient of the V elements from flat index i, following reference/gaussian.py's gaussian_backward.
template <typename T, int V>
__device__ __forceinline__ void bwd_elems(const BwdArgs& a, uint64_t seed, int64_t i) {
  float m[V], lv[V], pm[V] = {}, plv[V] = {}, g[V] = {}, dlv[V] = {};
  load_pack<T, V>(a.mu, i, m);
  load_pack<T, V>(a.lv, i, lv);
  if (a.dz) load_pack<T, V>(a.dz, i, g);
  if (a.dz && a.seed) {
#pragma unroll
    for (int j = 0; j < V; ++j)
      dlv[j] = 0.5f * g[j] * expf(0.5f * lv[j]) * philox_normal(seed, static_cast<uint64_t>(i + j));
  }
  if (a.w) {
    if (a.pm) load_pack<T, V>(a.pm, i, pm);
    if (a.plv) load_pack<T, V>(a.plv, i, plv);
    float w[V], dmu[V], dpm[V], dplv[V];
    if (a.mode == kSum || a.mode == kSample) {
      const float w0 = load_any(a.w, a.w_dtype, a.mode == kSum ? 0 : i / a.L);  // V | L: one row per pack
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = w0;
    } else {
      const int64_t base = a.mode == kLatent ? i % a.L : i;  // V | L: the pack stays in one row
#pragma unroll
      for (int j = 0; j < V; ++j) w[j] = load_any(a.w, a.w_dtype, base + j);
    }
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const float var = expf(lv[j]);
      const float diff = a.pm ? m[j] - pm[j] : m[j];
      if (a.plv) {
        const float inv_pvar = expf(-plv[j]);
        dmu[j] = w[j] * (diff * inv_pvar);
        dlv[j] += w[j] * (0.5f * (var * inv_pvar - 1.0f));
        dplv[j] = w[j] * 0.5f * (1.0f - (var + diff * diff) * inv_pvar);
      } else {
        dmu[j] = w[j] * diff;
        dlv[j] += w[j] * (0.5f * (var - 1.0f));
        dplv[j] = 0.f;
      }
      dpm[j] = -dmu[j];
    }
    if (a.dz) {
#pragma unroll
      for (int j = 0; j < V; ++j) dmu[j] += g[j];
    }
    store_pack<T, V>(a.dmu, i, dmu);
    if (a.dpm) store_pack<T, V>(a.dpm, i, dpm);
    if (a.dplv) store_pack<T, V>(a.dplv, i, dplv);
  }
  store_pack<T, V>(a.dlv, i, dlv);
}

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) bwd_flat(BwdArgs a) {
  const uint64_t seed = a.dz && a.seed ? static_cast<uint64_t>(*a.seed) : 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  const int64_t packs = a.numel / V;
  for (int64_t p = t0; p < packs; p += stride) bwd_elems<T, V>(a, seed, p * V);
  for (int64_t i = packs * V + t0; i < a.numel; i += stride) bwd_elems<T, 1>(a, seed, i);
}

__global__ void probe_kernel() {}

int pack_width(int dtype) { return dtype == kF32 ? 4 : 8; }

// Blocks of the grid-stride kernels: depends only on the size, the dtype and the device (so does the sum order).
unsigned flat_blocks(int device, int dtype, int64_t numel, const char* op) {
  const int64_t want = ceil_div(ceil_div(numel, pack_width(dtype)), kThreads);
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(want, 8LL * sm_count(device, op))));
}

// Geometry of fwd_2d for a (rows, L) view; P x M partial sums.
struct Plan2D {
  int G;
  int64_t col_blocks;
  dim3 grid;
  int64_t P, M;
};

Plan2D plan_2d(int dtype, int64_t numel, int64_t rows, int mode, const char* op) {
  const int64_t L = numel / rows, packs = ceil_div(L, pack_width(dtype));
  Plan2D p;
  p.G = pow2_ceil(std::min<int64_t>(packs, kThreads));
  p.col_blocks = ceil_div(packs, p.G);
  const int64_t row_blocks = ceil_div(rows, static_cast<int64_t>(kThreads / p.G) * kRowsPerThread);
  if (row_blocks > 0x7fffffffLL) fail(op, "too many rows for one launch");
  p.grid = dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(std::min<int64_t>(p.col_blocks, 65535)));
  p.P = mode == kLatent ? p.grid.x : p.grid.y;
  p.M = mode == kLatent ? L : rows;
  return p;
}

size_t forward_workspace(int device, int dtype, int64_t numel, int64_t rows, int mode, const char* op) {
  if (mode == kSum) return sizeof(float) * flat_blocks(device, dtype, numel, op);
  if (mode == kLatent || mode == kSample) {
    const Plan2D p = plan_2d(dtype, numel, rows, mode, op);
    return sizeof(float) * static_cast<size_t>(p.P * p.M);
  }
  return 0;
}

}  // namespace

size_t gaussian_forward_workspace(int device, int dtype, int64_t numel, int64_t rows, int kl_mode) {
  DeviceGuard guard(device, "gaussian_forward_workspace");
  return forward_workspace(device, dtype, numel, rows, kl_mode, "gaussian_forward_workspace");
}

void gaussian_forward(int device, uintptr_t stream, int dtype, int64_t numel, int64_t rows, uintptr_t mu,
                      uintptr_t logvar, uintptr_t prior_mu, uintptr_t prior_logvar, uintptr_t seed, uintptr_t z,
                      int kl_mode, uintptr_t kl, double kl_scale, uintptr_t workspace, size_t workspace_bytes) {
  const char* op = "gaussian_forward";
  DeviceGuard guard(device, op);
  if (workspace_bytes < forward_workspace(device, dtype, numel, rows, kl_mode, op)) fail(op, "workspace too small");
  FwdArgs a{reinterpret_cast<const void*>(mu),
            reinterpret_cast<const void*>(logvar),
            reinterpret_cast<const void*>(prior_mu),
            reinterpret_cast<const void*>(prior_logvar),
            reinterpret_cast<const int64_t*>(seed),
            reinterpret_cast<void*>(z),
            kl_mode == kElementwise ? reinterpret_cast<void*>(kl) : nullptr,
            kl_mode,
            numel,
            numel / rows};
  float* partial = reinterpret_cast<float*>(workspace);
  float* out = reinterpret_cast<float*>(kl);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  bool vec = aligned16(a.mu) && aligned16(a.lv) && aligned16(a.pm) && aligned16(a.plv) && aligned16(a.z) &&
             aligned16(a.kl);
  dispatch(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    if (kl_mode == kLatent || kl_mode == kSample) {
      const Plan2D p = plan_2d(dtype, numel, rows, kl_mode, op);
      if (vec && a.L % V == 0)
        fwd_2d<T, true><<<p.grid, kThreads, 0, s>>>(a, rows, p.G, p.col_blocks, partial);
      else
        fwd_2d<T, false><<<p.grid, kThreads, 0, s>>>(a, rows, p.G, p.col_blocks, partial);
      check_launch(op);
      launch_reduce_partials(partial, p.P, p.M, static_cast<float>(kl_scale), out, s, op);
      return;
    }
    const unsigned blocks = flat_blocks(device, dtype, numel, op);
    if (vec)
      fwd_flat<T, V><<<blocks, kThreads, 0, s>>>(a, partial);
    else
      fwd_flat<T, 1><<<blocks, kThreads, 0, s>>>(a, partial);
    check_launch(op);
    if (kl_mode == kSum) launch_reduce_partials(partial, blocks, 1, static_cast<float>(kl_scale), out, s, op);
  });
}

void gaussian_backward(int device, uintptr_t stream, int dtype, int64_t numel, int64_t rows, uintptr_t mu,
                       uintptr_t logvar, uintptr_t prior_mu, uintptr_t prior_logvar, uintptr_t seed, uintptr_t dz,
                       uintptr_t dkl, int dkl_dtype, int kl_mode, uintptr_t dmu, uintptr_t dlogvar,
                       uintptr_t dprior_mu, uintptr_t dprior_logvar) {
  const char* op = "gaussian_backward";
  DeviceGuard guard(device, op);
  BwdArgs a{reinterpret_cast<const void*>(mu),
            reinterpret_cast<const void*>(logvar),
            reinterpret_cast<const void*>(prior_mu),
            reinterpret_cast<const void*>(prior_logvar),
            reinterpret_cast<const int64_t*>(seed),
            reinterpret_cast<const void*>(dz),
            reinterpret_cast<const void*>(dkl),
            dkl_dtype,
            kl_mode,
            numel,
            numel / rows,
            reinterpret_cast<void*>(dmu),
            reinterpret_cast<void*>(dlogvar),
            reinterpret_cast<void*>(dprior_mu),
            reinterpret_cast<void*>(dprior_logvar)};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const bool aligned = aligned16(a.mu) && aligned16(a.lv) && aligned16(a.pm) && aligned16(a.plv) &&
                       aligned16(a.dz) && aligned16(a.dmu) && aligned16(a.dlv) && aligned16(a.dpm) &&
                       aligned16(a.dplv);
  const unsigned blocks = flat_blocks(device, dtype, numel, op);
  dispatch(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    const bool rows_fit = (kl_mode != kLatent && kl_mode != kSample) || a.L % V == 0;
    if (aligned && rows_fit)
      bwd_flat<T, V><<<blocks, kThreads, 0, s>>>(a);
    else
      bwd_flat<T, 1><<<blocks, kThreads, 0, s>>>(a);
    check_launch(op);
  });
}

std::string device_problem(int device) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string("the extension's CUDA runtime (CUDA ") + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) + ") cannot use this machine's driver: " +
           cudaGetErrorString(err);
  }
  if (device < 0 || device >= count) return "CUDA device " + std::to_string(device) + " does not exist";
  try {
    DeviceGuard guard(device, "device_check");
    cudaFuncAttributes attributes;
    err = cudaFuncGetAttributes(&attributes, probe_kernel);
    if (err != cudaSuccess) {
      cudaGetLastError();
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
      return "the extension has no kernel for this device (compute capability " + std::to_string(major) + "." +
             std::to_string(minor) + "): " + cudaGetErrorString(err) +
             "; rebuild with VAEKERNELS_CUDA_ARCHS including it";
    }
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

int cuda_version() { return CUDART_VERSION; }

void philox_host(uint64_t seed, uint64_t offset, int64_t n, uintptr_t words, uintptr_t normals) {
  auto* w = reinterpret_cast<uint32_t*>(words);
  auto* x = reinterpret_cast<float*>(normals);
  for (int64_t i = 0; i < n; ++i) {
    const PhiloxWords p = philox(seed, offset + static_cast<uint64_t>(i));
    w[2 * i] = p.x0;
    w[2 * i + 1] = p.x1;
    x[i] = philox_normal(seed, offset + static_cast<uint64_t>(i));
  }
}

}  // namespace vk
