// Host entry points of the CUDA backend, in plain C++ (no CUDA or PyTorch types): bindings.cpp exposes them.
// Tensors are raw device addresses (0 = absent), dtypes are codes (0 float32, 1 float16, 2 bfloat16), streams
// are cudaStream_t values; each call makes `device` current, launches on `stream` and throws
// std::runtime_error("vaekernels._C.<op>: <CUDA error>") on failure.
#pragma once
#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace vk {

// Rows view of a tensor along its channel axis: {inner, s_outer, s_inner, s_d}, see RowLayout in common.cuh.
using Layout = std::array<int64_t, 4>;

// gaussian.cu. kl_mode: 0 none, 1 elementwise, 2 sum, 3 latent (sum over dim 0), 4 sample (sum over the rest).
size_t gaussian_forward_workspace(int device, int dtype, int64_t numel, int64_t rows, int kl_mode);
void gaussian_forward(int device, uintptr_t stream, int dtype, int64_t numel, int64_t rows, uintptr_t mu,
                      uintptr_t logvar, uintptr_t prior_mu, uintptr_t prior_logvar, uintptr_t seed, uintptr_t z,
                      int kl_mode, uintptr_t kl, double kl_scale, uintptr_t workspace, size_t workspace_bytes);
void gaussian_backward(int device, uintptr_t stream, int dtype, int64_t numel, int64_t rows, uintptr_t mu,
                       uintptr_t logvar, uintptr_t prior_mu, uintptr_t prior_logvar, uintptr_t seed, uintptr_t dz,
                       uintptr_t dkl, int dkl_dtype, int kl_mode, uintptr_t dmu, uintptr_t dlogvar,
                       uintptr_t dprior_mu, uintptr_t dprior_logvar);
// "" when the extension's kernels can run on `device`, else why not (old driver, no kernel image, ...).
std::string device_problem(int device);
// CUDART_VERSION the extension was compiled with (e.g. 13000).
int cuda_version();
// The Philox stream on the host (same code as the kernels): words[2i], words[2i+1] and normals[i] for offset + i.
void philox_host(uint64_t seed, uint64_t offset, int64_t n, uintptr_t words, uintptr_t normals);

// vq.cu. precision: 0 exact float32, 1 tf32 tensor cores, 2 bf16 tensor cores (both re-scored in float32).
size_t vq_workspace(int device, int64_t n, int k, int d, int precision);
// Nearest-code search; with `quantized` also the VQ epilogue (quantized rows, per-code counts, sum of squared
// errors, and per-code sums of z when `sums` is given, accumulated with float atomics).
void vq_search(int device, uintptr_t stream, uintptr_t z, int z_dtype, const Layout& z_layout, int64_t n, int d,
               uintptr_t codebook, int cb_dtype, int k, int precision, uintptr_t indices, uintptr_t quantized,
               const Layout& q_layout, uintptr_t counts, uintptr_t sums, uintptr_t sq_err, uintptr_t workspace,
               size_t workspace_bytes);
// Deterministic per-code sums over rows sorted by code: out[k] += z rows (coef == 0), or
// scale * coef * (codebook[k] - z row) (coef: a 0-d device scalar). out must be zeroed.
size_t segment_sum_workspace(int64_t n, int d);
void segment_sum(int device, uintptr_t stream, uintptr_t z, int z_dtype, const Layout& z_layout, int64_t n, int d,
                 uintptr_t codebook, int cb_dtype, int k, uintptr_t order, uintptr_t keys, uintptr_t offsets,
                 uintptr_t coef, int coef_dtype, double scale, uintptr_t out, uintptr_t workspace,
                 size_t workspace_bytes);
// dz = T(dq) + scale * d_commit * (z - e) (T: identity or the rotation trick), and when dcodebook is given the
// float atomic scatter of scale * d_codebook * (e - z) into it (float32, zeroed).
void vq_backward(int device, uintptr_t stream, int dtype, int64_t n, int d, uintptr_t z,
                 const Layout& z_layout, uintptr_t dq, const Layout& dq_layout, uintptr_t codebook, int cb_dtype,
                 uintptr_t indices, uintptr_t d_commit, int d_commit_dtype, uintptr_t d_codebook,
                 int d_codebook_dtype, double scale, bool rotation, uintptr_t dz, const Layout& dz_layout,
                 uintptr_t dcodebook);

}  // namespace vk
