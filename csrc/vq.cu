// Nearest-codebook search with the VQ epilogue, deterministic per-code segment sums, and the VQ backward.
//
// Search: every block takes 64 rows (read through the row layout, so channel-first input needs no copy)
// against a range of codebook tiles (the K axis is split across blocks when rows alone cannot fill the GPU)
// and writes one candidate (distance, index) per row and split; `finish` merges the splits in order and runs the
// epilogue. Exact mode computes sum_d (z - e)^2 in float32 with 4 x 4 register blocking over shared-memory tiles;
// tf32 / bf16 modes score ||e||^2 - 2 z.e with WMMA tensor cores, keep the best few per row and re-score those
// exactly in float32. Lowest index wins ties; a NaN distance makes the row -1.
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <type_traits>

#include "common.cuh"

namespace vk {
namespace {

using namespace nvcuda;

enum Precision : int { kExact = 0, kTF32 = 1, kBF16 = 2 };

// Exact search tiles: 64 rows x 64 codes per block, 256 threads of 4 x 4 distances, D in chunks of 32.
constexpr int XBM = 64, XBN = 64, XBK = 32, kExactThreads = 256;
// Tensor-core search tiles: 64 x 64, 4 warps of 32 x 32 (2 x 2 fragments), D in chunks of 32;
// each of the two threads per row keeps its kTop best approximate scores for the exact re-scoring.
constexpr int TBM = 64, TBN = 64, TBK = 32, kTcThreads = 128, kTop = 4, kTcMinD = 32;
constexpr int kRowThreads = 256;  // row kernels: G threads per row (G | 32)
constexpr int kSegRows = 32;      // sorted positions per chunk in the deterministic segment sums

__device__ __forceinline__ bool better(float d, int k, float bd, int bk) { return d < bd || (d == bd && k < bk); }

// Running argmin with the reference's conventions: lowest index on ties, any NaN distance remembered.
__device__ __forceinline__ void consider(float d, int k, float& bd, int& bk, bool& nan) {
  if (isnan(d)) {
    nan = true;
  } else if (better(d, k, bd, bk)) {
    bd = d;
    bk = k;
  }
}

// cbT (D, K) float32 = codebook (K, D) transposed and converted: coalesced, conflict-free tile loads.
__global__ void prep_transpose(const void* __restrict__ cb, int cb_dtype, int K, int D, float* __restrict__ cbT) {
  __shared__ float tile[32][33];
  const int k0 = blockIdx.x * 32, d0 = blockIdx.y * 32;
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int k = k0 + i, d = d0 + threadIdx.x;
    if (k < K && d < D) tile[i][threadIdx.x] = load_any(cb, cb_dtype, static_cast<int64_t>(k) * D + d);
  }
  __syncthreads();
  for (int i = threadIdx.y; i < 32; i += 8) {
    const int d = d0 + i, k = k0 + threadIdx.x;
    if (k < K && d < D) cbT[static_cast<int64_t>(d) * K + k] = tile[threadIdx.x][i];
  }
}

template <typename OpT>
__device__ __forceinline__ OpT to_op(float v);
template <>
__device__ __forceinline__ float to_op<float>(float v) { return wmma::__float_to_tf32(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 to_op<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// cbq (Kp, Dp): the codebook rounded to the tensor-core type, zero-padded to whole tiles; norms[k] = ||e_k||^2
// in float32 from the unrounded values. One warp per (padded) code.
template <typename OpT>
__global__ void prep_tc(const void* __restrict__ cb, int cb_dtype, int K, int D, int Kp, int Dp,
                        OpT* __restrict__ cbq, float* __restrict__ norms) {
  const int k = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (k >= Kp) return;
  float n = 0.f;
  for (int d = lane; d < Dp; d += 32) {
    const float v = k < K && d < D ? load_any(cb, cb_dtype, static_cast<int64_t>(k) * D + d) : 0.f;
    cbq[static_cast<int64_t>(k) * Dp + d] = to_op<OpT>(v);
    n = fmaf(v, v, n);
  }
  n = warp_sum(n);
  if (lane == 0 && k < K) norms[k] = n;
}

// Exact float32 search of 64 rows against codebook tiles [blockIdx.y * tps, ...): thread (ty, tx) owns rows
// 4 ty + i and codes 4 tx + j of each tile and reads each from shared memory as one float4 per step of D.
template <typename T>
__global__ void __launch_bounds__(kExactThreads)
    search_exact(const T* __restrict__ z, RowLayout lz, int64_t N, int D, const float* __restrict__ cbT, int K,
                 int tiles, int tps, float* __restrict__ cand_d, int* __restrict__ cand_k) {
  __shared__ __align__(16) float zs[XBK][XBM + 4];
  __shared__ __align__(16) float es[XBK][XBN];
  __shared__ int64_t zrow[XBM];
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * XBM;
  if (tid < XBM) zrow[tid] = row0 + tid < N ? lz.row(row0 + tid) : -1;
  __syncthreads();

  // z[rows][d0, d0 + kc) into zs[c][r]; the thread order follows the layout so that global reads coalesce.
  auto load_z = [&](int d0, int kc) {
    for (int e = tid; e < XBM * XBK; e += kExactThreads) {
      const int r = lz.s_d == 1 ? e / XBK : e % XBM, c = lz.s_d == 1 ? e % XBK : e / XBM;
      float v = 0.f;
      if (c < kc && zrow[r] >= 0) v = to_f(z[zrow[r] + static_cast<int64_t>(d0 + c) * lz.s_d]);
      zs[c][r] = v;
    }
  };

  const int t_begin = blockIdx.y * tps, t_end = min(tiles, t_begin + tps), k_end = min(K, t_end * XBN);
  const int chunks = (D + XBK - 1) / XBK;
  float bd[4];
  int bk[4];
  bool bn[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    bd[i] = INFINITY;
    bk[i] = INT_MAX;
    bn[i] = false;
  }
  if (chunks == 1) load_z(0, D);  // small D: the rows stay in shared memory for every tile
  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * XBN;
    float acc[4][4] = {};
    for (int c = 0; c < chunks; ++c) {
      const int d0 = c * XBK, kc = min(XBK, D - d0);
      if (chunks > 1) load_z(d0, kc);
      for (int e = tid; e < XBN * XBK; e += kExactThreads) {
        const int j = e % XBN, cc = e / XBN, k = k0 + j;
        es[cc][j] = cc < kc && k < K ? cbT[static_cast<int64_t>(d0 + cc) * K + k] : 0.f;
      }
      __syncthreads();
#pragma unroll 4
      for (int kk = 0; kk < kc; ++kk) {
        const float4 a4 = *reinterpret_cast<const float4*>(&zs[kk][4 * ty]);
        const float4 b4 = *reinterpret_cast<const float4*>(&es[kk][4 * tx]);
        const float a[4] = {a4.x, a4.y, a4.z, a4.w}, b[4] = {b4.x, b4.y, b4.z, b4.w};
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float diff = a[i] - b[j];
            acc[i][j] = fmaf(diff, diff, acc[i][j]);
          }
      }
      __syncthreads();
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int k = k0 + 4 * tx + j;
      if (k < k_end) {
#pragma unroll
        for (int i = 0; i < 4; ++i) consider(acc[i][j], k, bd[i], bk[i], bn[i]);
      }
    }
  }
  // Merge the 16 threads of a row group (lanes differing in tx, inside one warp).
#pragma unroll
  for (int o = 8; o > 0; o >>= 1) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float od = __shfl_xor_sync(kFullMask, bd[i], o);
      const int ok = __shfl_xor_sync(kFullMask, bk[i], o);
      const int on = __shfl_xor_sync(kFullMask, static_cast<int>(bn[i]), o);
      bn[i] = bn[i] || on;
      if (better(od, ok, bd[i], bk[i])) {
        bd[i] = od;
        bk[i] = ok;
      }
    }
  }
  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + 4 * ty + i;
      if (row < N) {
        cand_d[blockIdx.y * N + row] = bd[i];
        cand_k[blockIdx.y * N + row] = bn[i] ? -1 : bk[i];
      }
    }
  }
}

// Tensor-core search (OpT float: tf32, __nv_bfloat16: bf16) of 64 rows against codebook tiles
// [blockIdx.y * tps, ...), then the float32 re-scoring of the 2 * kTop candidates of every row.
template <typename T, typename OpT>
__global__ void __launch_bounds__(kTcThreads)
    search_tc(const T* __restrict__ z, RowLayout lz, int64_t N, int D, int Dp, const OpT* __restrict__ cbq,
              const float* __restrict__ norms, const void* __restrict__ cb, int cb_dtype, int K, int tiles, int tps,
              float* __restrict__ cand_d, int* __restrict__ cand_k) {
  constexpr bool kTf32 = std::is_same<OpT, float>::value;
  constexpr int WK = kTf32 ? 8 : 16;
  using FragT = typename std::conditional<kTf32, wmma::precision::tf32, __nv_bfloat16>::type;
  constexpr int LDA = TBK + 8, LDC = TBM + 4, NC = 2 * kTop;
  constexpr int VE = 16 / sizeof(OpT), PER_ROW = TBK / VE;
  __shared__ __align__(32) OpT As[TBM * LDA];
  __shared__ __align__(32) OpT Bs[TBN * LDA];
  __shared__ __align__(32) float Cs[TBN * LDC];  // dot products, column-major: Cs[code * LDC + row]
  __shared__ float top_d[TBM][NC];
  __shared__ int top_k[TBM][NC];
  __shared__ int top_nan[TBM][2];
  __shared__ int64_t zrow[TBM];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, wy = warp / 2, wx = warp % 2;
  const int r_sel = tid % TBM, half = tid / TBM;  // this thread's row and half of each tile's codes
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TBM;
  if (tid < TBM) zrow[tid] = row0 + tid < N ? lz.row(row0 + tid) : -1;
  const int t_begin = blockIdx.y * tps, t_end = min(tiles, t_begin + tps), k_end = min(K, t_end * TBN);
  float td[kTop];
  int tk[kTop];
#pragma unroll
  for (int c = 0; c < kTop; ++c) {
    td[c] = INFINITY;
    tk[c] = INT_MAX;
  }
  bool tnan = false;
  __syncthreads();

  for (int t = t_begin; t < t_end; ++t) {
    const int k0 = t * TBN;
    wmma::fragment<wmma::accumulator, 16, 16, WK, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
    for (int d0 = 0; d0 < Dp; d0 += TBK) {
      for (int e = tid; e < TBM * TBK; e += kTcThreads) {
        const int r = lz.s_d == 1 ? e / TBK : e % TBM, c = lz.s_d == 1 ? e % TBK : e / TBM, d = d0 + c;
        float v = 0.f;
        if (zrow[r] >= 0 && d < D) v = to_f(z[zrow[r] + static_cast<int64_t>(d) * lz.s_d]);
        As[r * LDA + c] = to_op<OpT>(v);
      }
      for (int e = tid; e < TBN * PER_ROW; e += kTcThreads) {
        const int rr = e / PER_ROW, cc = (e % PER_ROW) * VE;
        *reinterpret_cast<uint4*>(&Bs[rr * LDA + cc]) =
            *reinterpret_cast<const uint4*>(&cbq[static_cast<int64_t>(k0 + rr) * Dp + d0 + cc]);
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < TBK; kk += WK) {
        wmma::fragment<wmma::matrix_a, 16, 16, WK, FragT, wmma::row_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, WK, FragT, wmma::col_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], &As[(wy * 32 + i * 16) * LDA + kk], LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], &Bs[(wx * 32 + j * 16) * LDA + kk], LDA);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(&Cs[(wx * 32 + j * 16) * LDC + wy * 32 + i * 16], acc[i][j], LDC,
                                wmma::mem_col_major);
    __syncthreads();
    // Cs is rewritten only after the next tile's synchronised D loop, so no barrier is needed after this scan.
    for (int jj = 0; jj < TBN / 2; ++jj) {
      const int c = half * (TBN / 2) + jj, k = k0 + c;
      if (k >= k_end) break;
      const float s = norms[k] - 2.f * Cs[c * LDC + r_sel];
      if (isnan(s)) {
        tnan = true;
      } else if (better(s, k, td[kTop - 1], tk[kTop - 1])) {
        td[kTop - 1] = s;
        tk[kTop - 1] = k;
#pragma unroll
        for (int q = kTop - 1; q > 0; --q) {
          if (better(td[q], tk[q], td[q - 1], tk[q - 1])) {
            const float sd = td[q];
            td[q] = td[q - 1];
            td[q - 1] = sd;
            const int sk = tk[q];
            tk[q] = tk[q - 1];
            tk[q - 1] = sk;
          }
        }
      }
    }
  }
#pragma unroll
  for (int c = 0; c < kTop; ++c) {
    top_d[r_sel][half * kTop + c] = td[c];
    top_k[r_sel][half * kTop + c] = tk[c];
  }
  top_nan[r_sel][half] = tnan;
  __syncthreads();

  // Exact float32 distances of the candidates: one warp per row, lanes over D.
  for (int rr = warp; rr < TBM; rr += kTcThreads / 32) {
    const int64_t row = row0 + rr;
    if (row >= N) break;
    float dist[NC];
    int kc[NC];
#pragma unroll
    for (int c = 0; c < NC; ++c) {
      dist[c] = 0.f;
      kc[c] = top_k[rr][c];
    }
    for (int d = lane; d < D; d += 32) {
      const float zv = to_f(z[zrow[rr] + static_cast<int64_t>(d) * lz.s_d]);
#pragma unroll
      for (int c = 0; c < NC; ++c) {
        if (kc[c] == INT_MAX) continue;
        const float diff = zv - load_any(cb, cb_dtype, static_cast<int64_t>(kc[c]) * D + d);
        dist[c] = fmaf(diff, diff, dist[c]);
      }
    }
#pragma unroll
    for (int c = 0; c < NC; ++c) dist[c] = warp_sum(dist[c]);
    if (lane == 0) {
      float bd = INFINITY;
      int bk = INT_MAX;
      bool nan = top_nan[rr][0] || top_nan[rr][1];
#pragma unroll
      for (int c = 0; c < NC; ++c)
        if (kc[c] != INT_MAX) consider(dist[c], kc[c], bd, bk, nan);
      cand_d[blockIdx.y * N + row] = bd;
      cand_k[blockIdx.y * N + row] = nan ? -1 : bk;
    }
  }
}

struct FinishArgs {
  const float* cand_d;
  const int* cand_k;
  int splits;
  int64_t N;
  int D, G;
  int64_t* idx;
  const void* cb;
  int cb_dtype;
  void* q;  // quantized (null for nearest_code)
  RowLayout lq;
  unsigned long long* counts;
  float* sums;  // float atomics; null in deterministic mode (segment_sum does it)
  const void* z;
  RowLayout lz;
  float* err;  // one partial sum of squared errors per block
};

// Merge the splits' candidates of each row (G threads per row), then the VQ epilogue.
template <typename T>
__global__ void __launch_bounds__(kRowThreads) finish(FinishArgs a) {
  const int G = a.G, lane = threadIdx.x % G;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / G;
  const bool valid = row < a.N;
  float bd = INFINITY;
  int bk = INT_MAX;
  bool nan = false;
  if (valid) {
    for (int s = 0; s < a.splits; ++s) {
      const int k = a.cand_k[s * a.N + row];
      if (k < 0)
        nan = true;
      else
        consider(a.cand_d[s * a.N + row], k, bd, bk, nan);
    }
  }
  const int64_t k = nan ? -1 : bk;
  if (valid) {
    if (lane == 0) {
      a.idx[row] = k;
      if (a.counts && k >= 0) atomicAdd(a.counts + k, 1ull);
    }
    if (a.q) {
      const int64_t base = a.lq.row(row);
      for (int d = lane; d < a.D; d += G) {
        const float v = k >= 0 ? load_any(a.cb, a.cb_dtype, k * a.D + d) : NAN;
        static_cast<T*>(a.q)[base + static_cast<int64_t>(d) * a.lq.s_d] = from_f<T>(v);
      }
    }
    if (a.sums && k >= 0) {
      const int64_t base = a.lz.row(row);
      for (int d = lane; d < a.D; d += G)
        atomicAdd(a.sums + k * a.D + d,
                  to_f(static_cast<const T*>(a.z)[base + static_cast<int64_t>(d) * a.lz.s_d]));
    }
  }
  if (a.err) {
    const float t = block_sum<kRowThreads>(valid && lane == 0 ? (nan ? NAN : bd) : 0.f);
    if (threadIdx.x == 0) a.err[blockIdx.x] = t;
  }
}

struct SegArgs {
  const void* z;
  RowLayout lz;
  int D;
  const void* cb;
  int cb_dtype;
  int K;
  const int64_t* order;    // row numbers sorted by code (stable)
  const int64_t* keys;     // their codes, K for rows without one
  const int64_t* offsets;  // (K + 1) segment starts; offsets[K] = rows with a code
  const void* coef;        // null: sum z rows; else scale * coef * (e - z)
  int coef_dtype;
  float scale;
  float* out;
  float* carry;  // (chunks, 2, D): partial sums of the runs that leave a chunk
};

// Thread (chunk, d) walks kSegRows sorted positions in order; runs of one code that lie inside the chunk are
// written out, runs that cross a chunk boundary go to carry[chunk][first run = 0 / last run = 1].
template <typename T>
__global__ void __launch_bounds__(kRowThreads) segsum_chunks(SegArgs a, int64_t chunks) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  const int64_t c = t / a.D;
  const int d = static_cast<int>(t % a.D);
  if (c >= chunks) return;
  const int64_t n_valid = a.offsets[a.K], p0 = c * kSegRows;
  if (p0 >= n_valid) return;
  const int64_t p1 = min(p0 + kSegRows, n_valid);
  const float cf = a.coef ? a.scale * load_any(a.coef, a.coef_dtype, 0) : 0.f;
  const T* z = static_cast<const T*>(a.z);
  auto flush = [&](int64_t k, int64_t s, int64_t e, float acc) {
    if (a.offsets[k] >= p0 && a.offsets[k + 1] <= p1) {
      a.out[k * a.D + d] = acc;
      return;
    }
    if (s == p0) a.carry[(c * 2) * a.D + d] = acc;
    if (e == p1) a.carry[(c * 2 + 1) * a.D + d] = acc;
  };
  int64_t run_k = a.keys[p0], run_s = p0;
  float acc = 0.f;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t k = a.keys[p];
    if (k != run_k) {
      flush(run_k, run_s, p, acc);
      run_k = k;
      run_s = p;
      acc = 0.f;
    }
    const float zv = to_f(z[a.lz.row(a.order[p]) + static_cast<int64_t>(d) * a.lz.s_d]);
    acc += a.coef ? cf * (load_any(a.cb, a.cb_dtype, k * a.D + d) - zv) : zv;
  }
  flush(run_k, run_s, p1, acc);
}

// Codes whose rows span several chunks: their carries, in chunk order.
__global__ void __launch_bounds__(kRowThreads) segsum_carry(SegArgs a) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x;
  if (t >= static_cast<int64_t>(a.K) * a.D) return;
  const int64_t k = t / a.D;
  const int d = static_cast<int>(t % a.D);
  const int64_t s = a.offsets[k], e = a.offsets[k + 1];
  if (e <= s) return;
  const int64_t cs = s / kSegRows, ce = (e - 1) / kSegRows;
  if (cs == ce) return;
  float acc = a.carry[(cs * 2 + 1) * a.D + d];
  for (int64_t c = cs + 1; c <= ce; ++c) acc += a.carry[(c * 2) * a.D + d];
  a.out[k * a.D + d] = acc;
}

struct VqBwdArgs {
  const void* z;
  RowLayout lz;
  const void* dq;  // null: no gradient through quantized
  RowLayout ldq;
  void* dz;
  RowLayout ldz;
  int64_t N;
  int D, G;
  const void* cb;
  int cb_dtype;
  const int64_t* idx;
  const void* d_commit;  // 0-d scalars or null
  int d_commit_dtype;
  const void* d_codebook;
  int d_codebook_dtype;
  float scale;  // 2 / numel
  bool rotation;
  float* dcb;  // float atomics target, null when not wanted here
};

// One row per G threads: dz = T(dq) + scale * d_commit * (z - e), T the identity or the rotation trick
// (reference/vq.py rotation_grad, from the row's dot products z.z, e.e, z.e, dq.z, dq.e), and the atomic
// scatter of scale * d_codebook * (e - z).
template <typename T>
__global__ void __launch_bounds__(kRowThreads) vq_bwd(VqBwdArgs a) {
  const int G = a.G, lane = threadIdx.x % G;
  const int64_t row = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / G;
  const bool valid = row < a.N;
  const T* z = static_cast<const T*>(a.z);
  const T* dq = static_cast<const T*>(a.dq);
  const int64_t k = valid ? a.idx[row] : 0;
  const int64_t zb = valid ? a.lz.row(row) : 0, gb = valid && dq ? a.ldq.row(row) : 0;
  auto code = [&](int d) { return k >= 0 ? load_any(a.cb, a.cb_dtype, k * a.D + d) : NAN; };
  const float c_commit = a.d_commit ? a.scale * load_any(a.d_commit, a.d_commit_dtype, 0) : 0.f;
  const float c_code = a.dcb ? a.scale * load_any(a.d_codebook, a.d_codebook_dtype, 0) : 0.f;
  const bool rot = a.rotation && dq;
  constexpr float eps = 1e-6f;
  float nz = 1.f, nec = 1.f, wn = 1.f, lam = 0.f, dqw = 0.f, dqq = 0.f;
  if (rot) {
    float zz = 0.f, ee = 0.f, ze = 0.f, gz = 0.f, ge = 0.f;
    if (valid) {
      for (int d = lane; d < a.D; d += G) {
        const float zv = to_f(z[zb + static_cast<int64_t>(d) * a.lz.s_d]), ev = code(d);
        const float gv = to_f(dq[gb + static_cast<int64_t>(d) * a.ldq.s_d]);
        zz = fmaf(zv, zv, zz);
        ee = fmaf(ev, ev, ee);
        ze = fmaf(zv, ev, ze);
        gz = fmaf(gv, zv, gz);
        ge = fmaf(gv, ev, ge);
      }
    }
    for (int o = G / 2; o > 0; o >>= 1) {
      zz += __shfl_xor_sync(kFullMask, zz, o);
      ee += __shfl_xor_sync(kFullMask, ee, o);
      ze += __shfl_xor_sync(kFullMask, ze, o);
      gz += __shfl_xor_sync(kFullMask, gz, o);
      ge += __shfl_xor_sync(kFullMask, ge, o);
    }
    // u = z / nz, q = e / nec, w = (u + q) / wn with |u + q|^2 = u.u + 2 u.q + q.q; lam = |e| / nz.
    nz = fmaxf(sqrtf(zz), eps);
    const float ne = sqrtf(ee);
    nec = fmaxf(ne, eps);
    const float uu = zz / (nz * nz), qq = ee / (nec * nec), uq = ze / (nz * nec);
    wn = fmaxf(sqrtf(fmaxf(uu + 2.f * uq + qq, 0.f)), eps);
    dqq = ge / nec;
    dqw = (gz / nz + dqq) / wn;
    lam = ne / nz;
  }
  if (!valid) return;
  const int64_t ob = a.ldz.row(row);
  for (int d = lane; d < a.D; d += G) {
    const float zv = to_f(z[zb + static_cast<int64_t>(d) * a.lz.s_d]), ev = code(d);
    float t = dq ? to_f(dq[gb + static_cast<int64_t>(d) * a.ldq.s_d]) : 0.f;
    if (rot) {
      const float u = zv / nz, w = (u + ev / nec) / wn;
      t = lam * (t - 2.f * dqw * w + 2.f * dqq * u);
    }
    if (a.d_commit) t += c_commit * (zv - ev);
    static_cast<T*>(a.dz)[ob + static_cast<int64_t>(d) * a.ldz.s_d] = from_f<T>(t);
    if (a.dcb && k >= 0) atomicAdd(a.dcb + k * a.D + d, c_code * (ev - zv));
  }
}

// Threads per row for the row kernels: lanes along D when D is contiguous, else one thread per row so that
// neighbouring threads read neighbouring rows (channel-first layouts).
int row_group(const RowLayout& l, int d) { return l.s_d == 1 ? std::min(32, pow2_ceil(d)) : 1; }

unsigned row_blocks(int64_t n, int g, const char* op) {
  const int64_t blocks = ceil_div(n * g, kRowThreads);
  if (blocks > 0x7fffffffLL) fail(op, "too many rows for one launch");
  return static_cast<unsigned>(std::max<int64_t>(blocks, 1));
}

// Search geometry and workspace layout (candidates, prepared codebook, error partials), 256-byte aligned pieces.
struct VqPlan {
  bool tc;
  int tiles, tps, splits, Kp, Dp;
  int64_t row_blocks, err_blocks;
  size_t off_cand_d, off_cand_k, off_cb, off_norms, off_err, total;
};

VqPlan plan_vq(int device, int64_t n, int k, int d, int precision, const char* op) {
  VqPlan p{};
  p.tc = precision != kExact && d >= kTcMinD;
  p.row_blocks = ceil_div(n, XBM);  // XBM == TBM, XBN == TBN
  if (p.row_blocks > 0x7fffffffLL) fail(op, "too many rows for one launch");
  p.tiles = static_cast<int>(ceil_div(k, XBN));
  const int64_t target = 2LL * sm_count(device, op);
  const int splits =
      p.row_blocks >= target ? 1 : static_cast<int>(std::min<int64_t>(p.tiles, ceil_div(target, p.row_blocks)));
  p.tps = static_cast<int>(ceil_div(p.tiles, splits));
  p.splits = static_cast<int>(ceil_div(p.tiles, p.tps));
  p.Kp = p.tiles * TBN;
  p.Dp = static_cast<int>(ceil_div(d, TBK)) * TBK;
  p.err_blocks = row_blocks(n, 32, op);  // the most finish() can use (G <= 32)
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off += align_up(bytes);
    return at;
  };
  const size_t cands = static_cast<size_t>(p.splits) * static_cast<size_t>(n);
  p.off_cand_d = take(sizeof(float) * cands);
  p.off_cand_k = take(sizeof(int) * cands);
  if (p.tc) {
    const size_t elem = precision == kTF32 ? sizeof(float) : sizeof(__nv_bfloat16);
    p.off_cb = take(elem * static_cast<size_t>(p.Kp) * p.Dp);
    p.off_norms = take(sizeof(float) * k);
  } else {
    p.off_cb = take(sizeof(float) * static_cast<size_t>(k) * d);
    p.off_norms = 0;
  }
  p.off_err = take(sizeof(float) * p.err_blocks);
  p.total = off;
  return p;
}

}  // namespace

size_t vq_workspace(int device, int64_t n, int k, int d, int precision) {
  DeviceGuard guard(device, "vq_workspace");
  return plan_vq(device, n, k, d, precision, "vq_workspace").total;
}

void vq_search(int device, uintptr_t stream, uintptr_t z, int z_dtype, const Layout& z_layout, int64_t n, int d,
               uintptr_t codebook, int cb_dtype, int k, int precision, uintptr_t indices, uintptr_t quantized,
               const Layout& q_layout, uintptr_t counts, uintptr_t sums, uintptr_t sq_err, uintptr_t workspace,
               size_t workspace_bytes) {
  const char* op = quantized ? "vq_forward" : "nearest_code";
  DeviceGuard guard(device, op);
  const VqPlan p = plan_vq(device, n, k, d, precision, op);
  if (workspace_bytes < p.total) fail(op, "workspace too small");
  char* ws = reinterpret_cast<char*>(workspace);
  float* cand_d = reinterpret_cast<float*>(ws + p.off_cand_d);
  int* cand_k = reinterpret_cast<int*>(ws + p.off_cand_k);
  const void* cb = reinterpret_cast<const void*>(codebook);
  const RowLayout lz = row_layout(z_layout), lq = row_layout(q_layout);
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const dim3 grid(static_cast<unsigned>(p.row_blocks), static_cast<unsigned>(p.splits));
  dispatch(z_dtype, op, [&](auto tag) {
    using T = decltype(tag);
    const T* zp = reinterpret_cast<const T*>(z);
    if (!p.tc) {
      float* cbT = reinterpret_cast<float*>(ws + p.off_cb);
      const dim3 tgrid(static_cast<unsigned>(ceil_div(k, 32)), static_cast<unsigned>(ceil_div(d, 32)));
      prep_transpose<<<tgrid, dim3(32, 8), 0, s>>>(cb, cb_dtype, k, d, cbT);
      check_launch(op);
      search_exact<T><<<grid, kExactThreads, 0, s>>>(zp, lz, n, d, cbT, k, p.tiles, p.tps, cand_d, cand_k);
      check_launch(op);
    } else {
      auto run_tc = [&](auto op_tag) {
        using OpT = decltype(op_tag);
        OpT* cbq = reinterpret_cast<OpT*>(ws + p.off_cb);
        float* norms = reinterpret_cast<float*>(ws + p.off_norms);
        prep_tc<OpT><<<static_cast<unsigned>(ceil_div(static_cast<int64_t>(p.Kp) * 32, 256)), 256, 0, s>>>(
            cb, cb_dtype, k, d, p.Kp, p.Dp, cbq, norms);
        check_launch(op);
        search_tc<T, OpT><<<grid, kTcThreads, 0, s>>>(zp, lz, n, d, p.Dp, cbq, norms, cb, cb_dtype, k, p.tiles,
                                                        p.tps, cand_d, cand_k);
        check_launch(op);
      };
      if (precision == kTF32)
        run_tc(float{});
      else
        run_tc(__nv_bfloat16{});
    }
    const int g = row_group(quantized ? lq : lz, d);
    const unsigned blocks = row_blocks(n, g, op);
    float* err = sq_err ? reinterpret_cast<float*>(ws + p.off_err) : nullptr;
    FinishArgs f{cand_d,
                 cand_k,
                 p.splits,
                 n,
                 d,
                 g,
                 reinterpret_cast<int64_t*>(indices),
                 cb,
                 cb_dtype,
                 reinterpret_cast<void*>(quantized),
                 lq,
                 reinterpret_cast<unsigned long long*>(counts),
                 reinterpret_cast<float*>(sums),
                 reinterpret_cast<const void*>(z),
                 lz,
                 err};
    finish<T><<<blocks, kRowThreads, 0, s>>>(f);
    check_launch(op);
    if (err) launch_reduce_partials(err, blocks, 1, 1.f, reinterpret_cast<float*>(sq_err), s, op);
  });
}

size_t segment_sum_workspace(int64_t n, int d) {
  return sizeof(float) * 2 * static_cast<size_t>(ceil_div(n, kSegRows)) * static_cast<size_t>(d);
}

void segment_sum(int device, uintptr_t stream, uintptr_t z, int z_dtype, const Layout& z_layout, int64_t n, int d,
                 uintptr_t codebook, int cb_dtype, int k, uintptr_t order, uintptr_t keys, uintptr_t offsets,
                 uintptr_t coef, int coef_dtype, double scale, uintptr_t out, uintptr_t workspace,
                 size_t workspace_bytes) {
  const char* op = "segment_sum";
  DeviceGuard guard(device, op);
  if (workspace_bytes < segment_sum_workspace(n, d)) fail(op, "workspace too small");
  SegArgs a{reinterpret_cast<const void*>(z),
            row_layout(z_layout),
            d,
            reinterpret_cast<const void*>(codebook),
            cb_dtype,
            k,
            reinterpret_cast<const int64_t*>(order),
            reinterpret_cast<const int64_t*>(keys),
            reinterpret_cast<const int64_t*>(offsets),
            reinterpret_cast<const void*>(coef),
            coef_dtype,
            static_cast<float>(scale),
            reinterpret_cast<float*>(out),
            reinterpret_cast<float*>(workspace)};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const int64_t chunks = ceil_div(n, kSegRows);
  const int64_t chunk_blocks = ceil_div(chunks * d, kRowThreads);
  const int64_t code_blocks = ceil_div(static_cast<int64_t>(k) * d, kRowThreads);
  if (chunk_blocks > 0x7fffffffLL || code_blocks > 0x7fffffffLL) fail(op, "too many rows for one launch");
  dispatch(z_dtype, op, [&](auto tag) {
    using T = decltype(tag);
    segsum_chunks<T><<<static_cast<unsigned>(chunk_blocks), kRowThreads, 0, s>>>(a, chunks);
    check_launch(op);
  });
  segsum_carry<<<static_cast<unsigned>(code_blocks), kRowThreads, 0, s>>>(a);
  check_launch(op);
}

void vq_backward(int device, uintptr_t stream, int dtype, int64_t n, int d, uintptr_t z,
                 const Layout& z_layout, uintptr_t dq, const Layout& dq_layout, uintptr_t codebook, int cb_dtype,
                 uintptr_t indices, uintptr_t d_commit, int d_commit_dtype, uintptr_t d_codebook,
                 int d_codebook_dtype, double scale, bool rotation, uintptr_t dz, const Layout& dz_layout,
                 uintptr_t dcodebook) {
  const char* op = "vq_backward";
  DeviceGuard guard(device, op);
  const RowLayout ldz = row_layout(dz_layout);
  const int g = row_group(ldz, d);
  VqBwdArgs a{reinterpret_cast<const void*>(z),
              row_layout(z_layout),
              reinterpret_cast<const void*>(dq),
              row_layout(dq_layout),
              reinterpret_cast<void*>(dz),
              ldz,
              n,
              d,
              g,
              reinterpret_cast<const void*>(codebook),
              cb_dtype,
              reinterpret_cast<const int64_t*>(indices),
              reinterpret_cast<const void*>(d_commit),
              d_commit_dtype,
              reinterpret_cast<const void*>(d_codebook),
              d_codebook_dtype,
              static_cast<float>(scale),
              rotation,
              reinterpret_cast<float*>(dcodebook)};
  const auto s = reinterpret_cast<cudaStream_t>(stream);
  const unsigned blocks = row_blocks(n, g, op);
  dispatch(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    vq_bwd<T><<<blocks, kRowThreads, 0, s>>>(a);
    check_launch(op);
  });
}

}  // namespace vk
