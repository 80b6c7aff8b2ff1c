"""Triton kernels for the code passes of index backpropagation quantization (vaekernels.reference.ibq's CodePasses).

Every pass rebuilds tiles of logits L = z C^T on tensor cores (float32 operands as three tf32 products, about
float32 accuracy; 16-bit inputs, exact in tf32, as one) and keeps nothing rows x codes beyond the tile in flight:
- the sweep: a program owns a tile of rows and a range of codes and folds its tiles into the running max and
  argmax, both softmax normalisers, sum exp((L - m) / T) (L - m) and P C (the flash-attention forward); code ranges
  give partial states that the host merges in a fixed order (O(splits N D));
- the column sums a_k: a program owns a tile of codes and a range of rows;
- rho_i = sum_k p_ik d_a_k and dz = dL C: a program owns a tile of rows and a range of codes;
- dC = dL^T z + one_hot^T g_hard: a program owns a tile of codes and a range of rows (the one-hot product only
  where an index falls in the tile).
Partial sums over ranges are added in a fixed order: no float atomics, bitwise reproducible. float64 and
D > 256 go to the reference backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import ibq as reference
from ._common import reduce_rows

MAX_D = 256  # rows and codes of one tile stay in registers; wider codes run the reference backend
_TARGET_PROGRAMS = 512  # ranges split the long loop until about this many programs run


@triton.jit
def _tile_logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """(z rows, code tile, L = z C^T) for one tile; z and C zero outside the masks."""
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    z = tl.load(z_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    c = tl.load(cb_ptr + codes.to(tl.int64)[:, None] * D + ds[None, :], mask=code_ok[:, None] & d_ok[None, :],
                other=0.0)
    return z, c, tl.dot(z, tl.trans(c), input_precision=PRECISION)


@triton.jit
def _sweep_kernel(z_ptr, cb_ptr, state_ptr, ind_ptr, pc_ptr, N, K, D, codes_per_split, inv_t,
                  ENTROPY: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_D: tl.constexpr):
    """For the program's rows and code range: state[split, :, n] = (max L, sum exp(L - m), sum exp((L - m) / T),
    sum exp((L - m) / T) (L - m), any NaN), ind[split, n] = first argmax, pc[split, n] = sum exp(L - m) C."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    split = tl.program_id(1)
    start = split * codes_per_split
    stop = tl.minimum(start + codes_per_split, K)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    nan = tl.zeros((BLOCK_M,), tl.int32)
    s1 = tl.zeros((BLOCK_M,), tl.float32)
    s_t = tl.zeros((BLOCK_M,), tl.float32)
    w_t = tl.zeros((BLOCK_M,), tl.float32)
    pc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        _, c, logits = _tile_logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_D)
        nan |= tl.max((logits != logits).to(tl.int32), axis=1)
        logits = tl.where(code_ok[None, :] & (logits == logits), logits, float("-inf"))
        bm, barg = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
        arg = tl.where(bm > m, barg + k0, arg)  # strictly greater: earlier tiles win ties
        new = tl.maximum(m, bm)
        shift = tl.where(s1 > 0, m - new, 0.0)  # 0 before the first tile (m = -inf, nothing accumulated)
        centred = logits - new[:, None]
        e1 = tl.exp(centred)
        s1 = s1 * tl.exp(shift) + tl.sum(e1, axis=1)
        pc = pc * tl.exp(shift)[:, None] + tl.dot(e1, c, input_precision="tf32x3")
        if ENTROPY:
            a_t = tl.exp(shift * inv_t)
            e_t = tl.exp(centred * inv_t)
            w_t = a_t * (w_t + shift * s_t) + tl.sum(tl.where(code_ok[None, :], e_t * centred, 0.0), axis=1)
            s_t = a_t * s_t + tl.sum(e_t, axis=1)
        m = new
    base = split.to(tl.int64) * 5 * N + rows
    tl.store(state_ptr + base, m, mask=row_ok)
    tl.store(state_ptr + base + N, s1, mask=row_ok)
    tl.store(state_ptr + base + 2 * N, s_t, mask=row_ok)
    tl.store(state_ptr + base + 3 * N, w_t, mask=row_ok)
    tl.store(state_ptr + base + 4 * N, nan.to(tl.float32), mask=row_ok)
    tl.store(ind_ptr + split.to(tl.int64) * N + rows, arg.to(tl.int64), mask=row_ok)
    ds = tl.arange(0, BLOCK_D)
    tl.store(pc_ptr + (split.to(tl.int64) * N + rows)[:, None] * D + ds[None, :], pc,
             mask=row_ok[:, None] & (ds[None, :] < D))


@triton.jit
def _row_stats(stats_ptr, rows, row_ok):
    """(max L, log sum exp(L - m), log sum exp((L - m) / T), H) of a tile of rows."""
    s = stats_ptr + rows.to(tl.int64) * 4
    return (tl.load(s, mask=row_ok, other=0.0), tl.load(s + 1, mask=row_ok, other=0.0),
            tl.load(s + 2, mask=row_ok, other=0.0), tl.load(s + 3, mask=row_ok, other=0.0))


@triton.jit
def _column_kernel(z_ptr, cb_ptr, stats_ptr, out_ptr, N, K, D, rows_per_split, inv_t, scale,
                   PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[split, k] = scale * sum over the split's rows of p_nk = exp((L - m) / T - log s_t)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_ok = codes < K
    split = tl.program_id(1)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        _, _, logits = _tile_logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_D)
        m, _, log_t, _ = _row_stats(stats_ptr, rows, row_ok)
        p = tl.exp((logits - m[:, None]) * inv_t - log_t[:, None])
        acc += tl.sum(tl.where(row_ok[:, None], p, 0.0), axis=0)
    tl.store(out_ptr + split.to(tl.int64) * K + codes, acc * scale, mask=code_ok)


@triton.jit
def _optional(ptr, idx, ok, PRESENT: tl.constexpr):
    """ptr[idx] where ok, or zeros when the vector is absent (PRESENT false: ptr is only a stand-in)."""
    if PRESENT:
        return tl.load(ptr + idx, mask=ok, other=0.0)
    return tl.zeros(idx.shape, tl.float32)


@triton.jit
def _logit_grad(logits, dp, m, log_1, log_t, h, delta, rho, d_avg, c_s, c_a, inv_t, HAS_S: tl.constexpr,
                HAS_A: tl.constexpr):
    """dL of a tile: P (dP - delta) - c_s p (log p + H) + c_a p (d_a - rho)."""
    centred = logits - m[:, None]
    dl = tl.exp(centred - log_1[:, None]) * (dp - delta[:, None])
    if HAS_S or HAS_A:
        logp = centred * inv_t - log_t[:, None]
        p = tl.exp(logp)
        if HAS_S:
            dl -= c_s * p * (logp + h[:, None])
        if HAS_A:
            dl += c_a * p * (d_avg[None, :] - rho[:, None])
    return dl


@triton.jit
def _row_kernel(z_ptr, cb_ptr, g_ptr, stats_ptr, delta_ptr, rho_ptr, d_avg_ptr, out_ptr, N, K, D,
                codes_per_split, inv_t, c_s, c_a, RHO: tl.constexpr, HAS_S: tl.constexpr, HAS_A: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Over the program's rows and code range: with RHO, out[split, n] = sum_k p_nk d_a_k; else
    out[split, n] = sum_k dL_nk C_k (D wide)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    split = tl.program_id(1)
    start = split * codes_per_split
    stop = tl.minimum(start + codes_per_split, K)
    m, log_1, log_t, h = _row_stats(stats_ptr, rows, row_ok)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    if RHO:
        acc_rho = tl.zeros((BLOCK_M,), tl.float32)
    else:
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        rho = _optional(rho_ptr, rows, row_ok, HAS_A)
        g = tl.load(g_ptr + rows.to(tl.int64)[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        _, c, logits = _tile_logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_D)
        d_avg = _optional(d_avg_ptr, codes, code_ok, HAS_A)
        if RHO:
            p = tl.exp((logits - m[:, None]) * inv_t - log_t[:, None])
            acc_rho += tl.sum(tl.where(code_ok[None, :], p * d_avg[None, :], 0.0), axis=1)
        else:
            dp = tl.dot(g, tl.trans(c), input_precision="tf32x3")
            dl = _logit_grad(logits, dp, m, log_1, log_t, h, delta, rho, d_avg, c_s, c_a, inv_t, HAS_S, HAS_A)
            dl = tl.where(code_ok[None, :], dl, 0.0)
            acc = tl.dot(dl, c, acc, input_precision="tf32x3")
    if RHO:
        tl.store(out_ptr + split.to(tl.int64) * N + rows, acc_rho, mask=row_ok)
    else:
        tl.store(out_ptr + (split.to(tl.int64) * N + rows)[:, None] * D + ds[None, :], acc,
                 mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _code_kernel(z_ptr, cb_ptr, g_ptr, g_hard_ptr, ind_ptr, stats_ptr, delta_ptr, rho_ptr, d_avg_ptr, out_ptr,
                 N, K, D, rows_per_split, inv_t, c_s, c_a, HAS_S: tl.constexpr, HAS_A: tl.constexpr,
                 PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[split, k] = sum over the split's rows of dL_nk z_n + [ind_n = k] g_hard_n (D wide)."""
    codes = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    code_ok = codes < K
    split = tl.program_id(1)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, N)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    d_avg = _optional(d_avg_ptr, codes, code_ok, HAS_A)
    acc = tl.zeros((BLOCK_K, BLOCK_D), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        z, c, logits = _tile_logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_D)
        m, log_1, log_t, h = _row_stats(stats_ptr, rows, row_ok)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        rho = _optional(rho_ptr, rows, row_ok, HAS_A)
        offs = rows.to(tl.int64)[:, None] * D + ds[None, :]
        g = tl.load(g_ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        dp = tl.dot(g, tl.trans(c), input_precision="tf32x3")
        dl = _logit_grad(logits, dp, m, log_1, log_t, h, delta, rho, d_avg, c_s, c_a, inv_t, HAS_S, HAS_A)
        dl = tl.where(row_ok[:, None], dl, 0.0)
        acc = tl.dot(tl.trans(dl), z, acc, input_precision="tf32x3")
        ind = tl.load(ind_ptr + rows, mask=row_ok, other=-1)
        hit = ind[:, None] == codes[None, :]
        if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:  # most tiles of a large codebook hold no index
            g_hard = tl.load(g_hard_ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            acc = tl.dot(tl.trans(hit.to(tl.float32)), g_hard, acc, input_precision="tf32x3")
    tl.store(out_ptr + (split.to(tl.int64) * K + codes)[:, None] * D + ds[None, :], acc,
             mask=code_ok[:, None] & d_ok[None, :])


def _blocks(d: int) -> tuple[int, int, int]:
    """(rows per tile, codes per tile, BLOCK_D): tiles of L and the D-wide accumulator fit the registers."""
    block_d = max(16, triton.next_power_of_2(d))
    return (64, 64, block_d) if block_d <= 64 else (64, 32, block_d) if block_d <= 128 else (32, 32, block_d)


def _split(long: int, tiles: int, block: int) -> tuple[int, int]:
    """(ranges, elements per range, a multiple of block) splitting the `long` loop so that tiles x ranges is about
    _TARGET_PROGRAMS."""
    ranges = max(1, min(triton.cdiv(long, block), _TARGET_PROGRAMS // max(tiles, 1)))
    per = triton.cdiv(triton.cdiv(long, ranges), block) * block
    return triton.cdiv(long, per), per


_PRECISION = {True: "tf32", False: "tf32x3"}  # exact-in-tf32 operands (16-bit inputs) take one product


class _Plan:
    """The launch parameters shared by one call's kernels."""

    def __init__(self, zr, cb, exact_tf32):
        self.n, self.d = zr.shape
        self.k = cb.shape[0]
        self.block_m, self.block_k, self.block_d = _blocks(self.d)
        self.precision = _PRECISION[exact_tf32]
        self.row_tiles = triton.cdiv(self.n, self.block_m)
        self.code_tiles = triton.cdiv(self.k, self.block_k)
        self.code_splits, self.codes_per_split = _split(self.k, self.row_tiles, self.block_k)
        self.row_splits, self.rows_per_split = _split(self.n, self.code_tiles, self.block_m)
        self.warps = 4 if self.block_d <= 64 else 8
        self.stages = 1 if self.block_d > 128 else 2  # pipelined copies of the D-wide tiles must fit shared memory


def _sweep(zr, cb, temperature, entropy, exact_tf32=False):
    p = _Plan(zr, cb, exact_tf32)
    state = zr.new_empty(p.code_splits, 5, p.n)
    ind = torch.empty(p.code_splits, p.n, dtype=torch.int64, device=zr.device)
    pc = zr.new_empty(p.code_splits, p.n, p.d)
    _sweep_kernel[(p.row_tiles, p.code_splits)](
        zr, cb, state, ind, pc, p.n, p.k, p.d, p.codes_per_split, 1.0 / temperature, ENTROPY=entropy,
        PRECISION=p.precision, BLOCK_M=p.block_m, BLOCK_K=p.block_k, BLOCK_D=p.block_d, num_warps=p.warps, num_stages=p.stages)
    m, s1, s_t, w_t, nan = state.unbind(1)
    top = m.amax(0)
    first = (m == top).to(torch.int8).argmax(0)  # the lowest code range holding the maximum: lowest index on ties
    ind = ind.gather(0, first[None]).squeeze(0).masked_fill_(nan.amax(0) > 0, -1)
    shift = m - top
    scale = shift.exp()
    s1 = (s1 * scale).sum(0)
    pc = (pc * scale[:, :, None]).sum(0) / s1[:, None]
    top = top.masked_fill(ind < 0, float("nan"))
    if entropy:
        a_t = (shift / temperature).exp()
        w_t = (a_t * (w_t + shift * s_t)).sum(0)
        log_t = (a_t * s_t).sum(0).log()
        h = log_t - w_t / (temperature * log_t.exp())
    else:
        log_t = h = torch.zeros_like(top)
    return ind, torch.stack([top, s1.log(), log_t, h], 1), pc


def _column_sums(zr, cb, stats, temperature, exact_tf32=False):
    p = _Plan(zr, cb, exact_tf32)
    out = zr.new_empty(p.row_splits, p.k)
    scale = 1.0 / p.n if p.row_splits == 1 else 1.0
    _column_kernel[(p.code_tiles, p.row_splits)](
        zr, cb, stats, out, p.n, p.k, p.d, p.rows_per_split, 1.0 / temperature, scale, PRECISION=p.precision,
        BLOCK_N=p.block_m, BLOCK_K=p.block_k, BLOCK_D=p.block_d, num_warps=p.warps, num_stages=p.stages)
    return out[0] if p.row_splits == 1 else reduce_rows(out, 1.0 / p.n)


def _rho(zr, cb, stats, temperature, d_avg, exact_tf32=False):
    p = _Plan(zr, cb, exact_tf32)
    out = zr.new_empty(p.code_splits, p.n)
    _row_kernel[(p.row_tiles, p.code_splits)](
        zr, cb, zr, stats, zr, zr, d_avg, out, p.n, p.k, p.d, p.codes_per_split, 1.0 / temperature, 0.0, 0.0,
        RHO=True, HAS_S=False, HAS_A=True, PRECISION=p.precision, BLOCK_M=p.block_m, BLOCK_K=p.block_k,
        BLOCK_D=p.block_d, num_warps=p.warps, num_stages=p.stages)
    return out.sum(0)


def _gradients(zr, cb, g, g_hard, ind, stats, delta, rho, d_avg, c_s, temperature, exact_tf32=False):
    p = _Plan(zr, cb, exact_tf32)
    has_s, has_a = c_s is not None, rho is not None
    c_s = float(c_s) if has_s else 0.0
    c_a = 1.0 / (p.n * temperature)
    rho = rho if has_a else delta
    d_avg = d_avg if has_a else delta
    common = dict(HAS_S=has_s, HAS_A=has_a, PRECISION=p.precision, BLOCK_K=p.block_k, BLOCK_D=p.block_d,
                  num_warps=p.warps, num_stages=p.stages)
    dz = zr.new_empty(p.code_splits, p.n, p.d)
    _row_kernel[(p.row_tiles, p.code_splits)](
        zr, cb, g, stats, delta, rho, d_avg, dz, p.n, p.k, p.d, p.codes_per_split, 1.0 / temperature, c_s, c_a,
        RHO=False, BLOCK_M=p.block_m, **common)
    dc = zr.new_empty(p.row_splits, p.k, p.d)
    _code_kernel[(p.code_tiles, p.row_splits)](
        zr, cb, g, g_hard, ind, stats, delta, rho, d_avg, dc, p.n, p.k, p.d, p.rows_per_split, 1.0 / temperature,
        c_s, c_a, BLOCK_N=p.block_m, **common)
    return dz.sum(0), dc.sum(0)


def _passes(exact_tf32: bool) -> reference.CodePasses:
    if not exact_tf32:
        return PASSES
    return reference.CodePasses(
        lambda *a: _sweep(*a, exact_tf32=True), lambda *a: _column_sums(*a, exact_tf32=True),
        lambda *a: _rho(*a, exact_tf32=True), lambda *a: _gradients(*a, exact_tf32=True))


PASSES = reference.CodePasses(_sweep, _column_sums, _rho, _gradients)


def _delegated(z, codebook) -> bool:
    return torch.float64 in (z.dtype, codebook.dtype) or codebook.shape[1] > MAX_D


def _exact_tf32(z, codebook) -> bool:
    """16-bit inputs: their float32 copies are exact in tf32, so the logits need one tensor-core product."""
    return z.element_size() == 2 and codebook.element_size() == 2


def ibq_forward(z, codebook, dim, beta, temperature, entropy):
    if _delegated(z, codebook):
        return reference.ibq_forward(z, codebook, dim, beta, temperature, entropy)
    return reference.forward(_passes(_exact_tf32(z, codebook)), z, codebook, dim, beta, temperature, entropy)


def ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    if _delegated(z, codebook):
        return reference.ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta,
                                      temperature)
    return reference.backward(_passes(_exact_tf32(z, codebook)), dq, d_avg, d_ps, d_quant, z, codebook, indices,
                              stats, pc, dim, beta, temperature)
