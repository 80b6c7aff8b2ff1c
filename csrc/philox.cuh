// Philox4x32-10 and Box-Muller normals: the exact stream of Triton's tl.randn(seed, offset).
//
// key = (seed & 0xffffffff, seed >> 32), counter = (offset & 0xffffffff, offset >> 32, 0, 0); the first two
// output words become uniforms by int32 bitcast, x < 0 ? ~x : x, times 4.6566127342e-10; then
// sqrt(-2 ln max(1e-7, u1)) * cos(2 pi u2), all in float32 (vaekernels/reference/philox.py is the oracle).
// Host and device share this code so that a CPU test can check the stream (vaekernels._C.philox_host).
#pragma once
#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define VK_HD __host__ __device__ __forceinline__
#else
#define VK_HD inline
#endif

namespace vk {

VK_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

struct PhiloxWords {
  uint32_t x0, x1;
};

// The first two of the four Philox4x32-10 output words for one (seed, offset).
VK_HD PhiloxWords philox(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const uint32_t hi_b = mulhi32(0xCD9E8D57u, c2), lo_b = 0xCD9E8D57u * c2;
    const uint32_t hi_a = mulhi32(0xD2511F53u, c0), lo_a = 0xD2511F53u * c0;
    c0 = hi_b ^ c1 ^ k0;
    c1 = lo_b;
    c2 = hi_a ^ c3 ^ k1;
    c3 = lo_a;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return {c0, c1};
}

VK_HD float philox_uniform(uint32_t word) {
  int32_t x = static_cast<int32_t>(word);
  x = x < 0 ? ~x : x;
  return static_cast<float>(x) * 4.6566127342e-10f;
}

VK_HD float philox_normal(uint64_t seed, uint64_t offset) {
  const PhiloxWords w = philox(seed, offset);
  const float u1 = fmaxf(1.0e-7f, philox_uniform(w.x0));
  const float u2 = philox_uniform(w.x1);
  const float theta = 6.283185307179586f * u2;
  return sqrtf(-2.0f * logf(u1)) * cosf(theta);
}

}  // namespace vk
