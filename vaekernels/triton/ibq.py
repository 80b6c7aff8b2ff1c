"""Triton kernels for the code passes of index backpropagation quantization (vaekernels.reference.ibq's CodePasses).

Every pass rebuilds tiles of logits L = z C^T on tensor cores (float32 operands as three tf32 products, about
float32 accuracy; 16-bit inputs, exact in tf32, as one), looping over D in chunks of 16, and keeps nothing rows
x codes beyond the tile in flight; a D-wide accumulator (P C, dz, dC) is split into column chunks of at most 128,
one per program, so that no kernel spills registers at D = 256 (see _Plan):
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

MAX_D = 256  # wider codes run the reference backend
_TARGET_PROGRAMS = 512  # ranges split the long loop until about this many programs run


@triton.jit
def _dots(a_ptr, b_ptr, c_ptr, a_rows, a_ok, c_rows, c_ok, D, TWO: tl.constexpr, PRECISION: tl.constexpr,
          PRECISION_B: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """(a c^T, b c^T) for a tile of rows of a and b (b only with TWO, else zeros) and a tile of rows of c, all
    (*, D) matrices, over D in chunks of BLOCK_D: registers hold BLOCK_D columns at a time, whatever D is."""
    ac = tl.zeros((BLOCK_A, BLOCK_C), tl.float32)
    bc = tl.zeros((BLOCK_A, BLOCK_C), tl.float32)
    a_off = a_rows.to(tl.int64)[:, None] * D
    c_off = c_rows.to(tl.int64)[:, None] * D
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        a_mask = a_ok[:, None] & (ds < D)[None, :]
        c = tl.load(c_ptr + c_off + ds[None, :], mask=c_ok[:, None] & (ds < D)[None, :], other=0.0)
        ac = tl.dot(tl.load(a_ptr + a_off + ds[None, :], mask=a_mask, other=0.0), tl.trans(c), ac,
                    input_precision=PRECISION)
        if TWO:
            bc = tl.dot(tl.load(b_ptr + a_off + ds[None, :], mask=a_mask, other=0.0), tl.trans(c), bc,
                        input_precision=PRECISION_B)
    return ac, bc


@triton.jit
def _logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION: tl.constexpr, BLOCK_A: tl.constexpr,
            BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    """L = z C^T for a tile of rows and a tile of codes."""
    logits, _ = _dots(z_ptr, z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, False, PRECISION, PRECISION, BLOCK_A,
                      BLOCK_C, BLOCK_D)
    return logits


@triton.jit
def _columns(ptr, rows, row_ok, part, D, BLOCK_O: tl.constexpr):
    """Pointers and mask of the program's BLOCK_O-wide column chunk `part` of rows of a (*, D) matrix."""
    cols = part * BLOCK_O + tl.arange(0, BLOCK_O)
    return ptr + rows.to(tl.int64)[:, None] * D + cols[None, :], row_ok[:, None] & (cols < D)[None, :]


@triton.jit
def _program_tile(owned, long, per_split, BLOCK: tl.constexpr):
    """(the program's tile of the axis it owns, its mask, its split, the split's [start, stop) along the axis it
    loops over): axis 0 of the grid tiles the owned axis, axis 1 splits the long one."""
    tile = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    split = tl.program_id(1)
    start = split * per_split
    return tile, tile < owned, split, start, tl.minimum(start + per_split, long)


@triton.jit
def _sweep_kernel(z_ptr, cb_ptr, state_ptr, ind_ptr, pc_ptr, N, K, D, codes_per_split, inv_t,
                  ENTROPY: tl.constexpr, PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr):
    """For the program's rows and code range: state[split, :, n] = (max L, sum exp(L - m), sum exp((L - m) / T),
    sum exp((L - m) / T) (L - m), any NaN), ind[split, n] = first argmax (both written by column chunk 0),
    pc[split, n, chunk] = sum exp(L - m) C[:, chunk]."""
    rows, row_ok, split, start, stop = _program_tile(N, K, codes_per_split, BLOCK_M)
    part = tl.program_id(2)
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    arg = tl.zeros((BLOCK_M,), tl.int32)
    nan = tl.zeros((BLOCK_M,), tl.int32)
    s1 = tl.zeros((BLOCK_M,), tl.float32)
    s_t = tl.zeros((BLOCK_M,), tl.float32)
    w_t = tl.zeros((BLOCK_M,), tl.float32)
    pc = tl.zeros((BLOCK_M, BLOCK_O), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        logits = _logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_M, BLOCK_K, BLOCK_D)
        nan |= tl.max((logits != logits).to(tl.int32), axis=1)
        logits = tl.where(code_ok[None, :] & (logits == logits), logits, float("-inf"))
        bm, barg = tl.max(logits, axis=1, return_indices=True, return_indices_tie_break_left=True)
        arg = tl.where(bm > m, barg + k0, arg)  # strictly greater: earlier tiles win ties
        new = tl.maximum(m, bm)
        shift = tl.where(s1 > 0, m - new, 0.0)  # 0 before the first tile (m = -inf, nothing accumulated)
        centred = logits - new[:, None]
        e1 = tl.exp(centred)
        s1 = s1 * tl.exp(shift) + tl.sum(e1, axis=1)
        c_at, c_mask = _columns(cb_ptr, codes, code_ok, part, D, BLOCK_O)
        pc = pc * tl.exp(shift)[:, None] + tl.dot(e1, tl.load(c_at, mask=c_mask, other=0.0),
                                                  input_precision="tf32x3")
        if ENTROPY:
            a_t = tl.exp(shift * inv_t)
            e_t = tl.exp(centred * inv_t)
            w_t = a_t * (w_t + shift * s_t) + tl.sum(tl.where(code_ok[None, :], e_t * centred, 0.0), axis=1)
            s_t = a_t * s_t + tl.sum(e_t, axis=1)
        m = new
    if part == 0:
        base = split.to(tl.int64) * 5 * N + rows
        tl.store(state_ptr + base, m, mask=row_ok)
        tl.store(state_ptr + base + N, s1, mask=row_ok)
        tl.store(state_ptr + base + 2 * N, s_t, mask=row_ok)
        tl.store(state_ptr + base + 3 * N, w_t, mask=row_ok)
        tl.store(state_ptr + base + 4 * N, nan.to(tl.float32), mask=row_ok)
        tl.store(ind_ptr + split.to(tl.int64) * N + rows, arg.to(tl.int64), mask=row_ok)
    pc_at, pc_mask = _columns(pc_ptr, split.to(tl.int64) * N + rows, row_ok, part, D, BLOCK_O)
    tl.store(pc_at, pc, mask=pc_mask)


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
    codes, code_ok, split, start, stop = _program_tile(K, N, rows_per_split, BLOCK_K)
    acc = tl.zeros((BLOCK_K,), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        logits = _logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
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
def _rho_kernel(z_ptr, cb_ptr, stats_ptr, d_avg_ptr, out_ptr, N, K, D, codes_per_split, inv_t,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """out[split, n] = sum over the split's codes of p_nk d_a_k."""
    rows, row_ok, split, start, stop = _program_tile(N, K, codes_per_split, BLOCK_M)
    m, _, log_t, _ = _row_stats(stats_ptr, rows, row_ok)
    acc = tl.zeros((BLOCK_M,), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        logits = _logits(z_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, PRECISION, BLOCK_M, BLOCK_K, BLOCK_D)
        p = tl.exp((logits - m[:, None]) * inv_t - log_t[:, None])
        d_avg = tl.load(d_avg_ptr + codes, mask=code_ok, other=0.0)
        acc += tl.sum(tl.where(code_ok[None, :], p * d_avg[None, :], 0.0), axis=1)
    tl.store(out_ptr + split.to(tl.int64) * N + rows, acc, mask=row_ok)


@triton.jit
def _dz_kernel(z_ptr, cb_ptr, g_ptr, stats_ptr, delta_ptr, rho_ptr, d_avg_ptr, out_ptr, N, K, D, codes_per_split,
               inv_t, c_s, c_a, HAS_S: tl.constexpr, HAS_A: tl.constexpr, PRECISION: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_O: tl.constexpr):
    """out[split, n, chunk] = sum over the split's codes of dL_nk C[k, chunk]."""
    rows, row_ok, split, start, stop = _program_tile(N, K, codes_per_split, BLOCK_M)
    part = tl.program_id(2)
    m, log_1, log_t, h = _row_stats(stats_ptr, rows, row_ok)
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
    rho = _optional(rho_ptr, rows, row_ok, HAS_A)
    acc = tl.zeros((BLOCK_M, BLOCK_O), tl.float32)
    for k0 in range(start, stop, BLOCK_K):
        codes = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes < stop
        logits, dp = _dots(z_ptr, g_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, True, PRECISION, "tf32x3", BLOCK_M,
                           BLOCK_K, BLOCK_D)
        d_avg = _optional(d_avg_ptr, codes, code_ok, HAS_A)
        dl = _logit_grad(logits, dp, m, log_1, log_t, h, delta, rho, d_avg, c_s, c_a, inv_t, HAS_S, HAS_A)
        c_at, c_mask = _columns(cb_ptr, codes, code_ok, part, D, BLOCK_O)
        acc = tl.dot(tl.where(code_ok[None, :], dl, 0.0), tl.load(c_at, mask=c_mask, other=0.0), acc,
                     input_precision="tf32x3")
    out_at, out_mask = _columns(out_ptr, split.to(tl.int64) * N + rows, row_ok, part, D, BLOCK_O)
    tl.store(out_at, acc, mask=out_mask)


@triton.jit
def _dc_kernel(z_ptr, cb_ptr, g_ptr, g_hard_ptr, ind_ptr, stats_ptr, delta_ptr, rho_ptr, d_avg_ptr, out_ptr,
               N, K, D, rows_per_split, inv_t, c_s, c_a, HAS_S: tl.constexpr, HAS_A: tl.constexpr,
               PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_O: tl.constexpr):
    """out[split, k, chunk] = sum over the split's rows of dL_nk z[n, chunk] + [ind_n = k] g_hard[n, chunk]."""
    codes, code_ok, split, start, stop = _program_tile(K, N, rows_per_split, BLOCK_K)
    part = tl.program_id(2)
    d_avg = _optional(d_avg_ptr, codes, code_ok, HAS_A)
    acc = tl.zeros((BLOCK_K, BLOCK_O), tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < stop
        logits, dp = _dots(z_ptr, g_ptr, cb_ptr, rows, row_ok, codes, code_ok, D, True, PRECISION, "tf32x3", BLOCK_N,
                           BLOCK_K, BLOCK_D)
        m, log_1, log_t, h = _row_stats(stats_ptr, rows, row_ok)
        delta = tl.load(delta_ptr + rows, mask=row_ok, other=0.0)
        rho = _optional(rho_ptr, rows, row_ok, HAS_A)
        dl = _logit_grad(logits, dp, m, log_1, log_t, h, delta, rho, d_avg, c_s, c_a, inv_t, HAS_S, HAS_A)
        z_at, z_mask = _columns(z_ptr, rows, row_ok, part, D, BLOCK_O)
        acc = tl.dot(tl.trans(tl.where(row_ok[:, None], dl, 0.0)), tl.load(z_at, mask=z_mask, other=0.0), acc,
                     input_precision="tf32x3")
        ind = tl.load(ind_ptr + rows, mask=row_ok, other=-1)
        hit = ind[:, None] == codes[None, :]
        if tl.max(tl.max(hit.to(tl.int32), axis=1), axis=0) > 0:  # most tiles of a large codebook hold no index
            g_at, g_mask = _columns(g_hard_ptr, rows, row_ok, part, D, BLOCK_O)
            acc = tl.dot(tl.trans(hit.to(tl.float32)), tl.load(g_at, mask=g_mask, other=0.0), acc,
                         input_precision="tf32x3")
    out_at, out_mask = _columns(out_ptr, split.to(tl.int64) * K + codes, code_ok, part, D, BLOCK_O)
    tl.store(out_at, acc, mask=out_mask)


def _split(long: int, tiles: int, block: int) -> tuple[int, int]:
    """(ranges, elements per range, a multiple of block) splitting the `long` loop so that tiles x ranges is about
    _TARGET_PROGRAMS."""
    ranges = max(1, min(triton.cdiv(long, block), _TARGET_PROGRAMS // max(tiles, 1)))
    per = triton.cdiv(triton.cdiv(long, ranges), block) * block
    return triton.cdiv(long, per), per


_PRECISION = {True: "tf32", False: "tf32x3"}  # exact-in-tf32 operands (16-bit inputs) take one product


class _Plan:
    """The launch parameters shared by one call's kernels. Every kernel forms its logits in tiles of 64 rows x 16
    codes (programs own 64 rows or 16 codes), z first, over D in chunks of 16: each recomputes a logit to the same
    bits as the sweep did, which the entropy gradients need (at T = 0.01 they amplify a logit's last bit a
    hundredfold). A D-wide accumulator is split into column chunks, one per program, each recomputing its tiles'
    logits: of at most 128 for P C and dz, 64 for dC (which also holds dP and the one-hot tile). Larger tiles or
    chunks spill registers at D = 256 on sm_80 or sm_90 (tests/test_triton_compile.py)."""

    def __init__(self, zr, cb, exact_tf32):
        self.n, self.d = zr.shape
        self.k = cb.shape[0]
        width = max(16, triton.next_power_of_2(self.d))
        self.block_o, self.dc_block_o = min(width, 128), min(width, 64)
        self.parts, self.dc_parts = triton.cdiv(self.d, self.block_o), triton.cdiv(self.d, self.dc_block_o)
        self.rows, self.codes = 64, 16  # the logit tile
        self.row_tiles = triton.cdiv(self.n, self.rows)
        self.code_tiles = triton.cdiv(self.k, self.codes)
        self.code_splits, self.codes_per_split = _split(self.k, self.row_tiles * self.parts, self.codes)
        self.row_splits, self.rows_per_split = _split(self.n, self.code_tiles * self.dc_parts, self.rows)
        self.launch = dict(PRECISION=_PRECISION[exact_tf32], BLOCK_D=16, num_warps=8, num_stages=2)


def _forward(zr, cb, temperature, entropy, exact_tf32=False):
    """The sweep (partial states over code ranges, merged here in a fixed order), then the column sums."""
    p = _Plan(zr, cb, exact_tf32)
    state = zr.new_empty(p.code_splits, 5, p.n)
    ind = torch.empty(p.code_splits, p.n, dtype=torch.int64, device=zr.device)
    pc = zr.new_empty(p.code_splits, p.n, p.d)
    _sweep_kernel[(p.row_tiles, p.code_splits, p.parts)](
        zr, cb, state, ind, pc, p.n, p.k, p.d, p.codes_per_split, 1.0 / temperature, ENTROPY=entropy,
        BLOCK_M=p.rows, BLOCK_K=p.codes, BLOCK_O=p.block_o, **p.launch)
    m, s1, s_t, w_t, nan = state.unbind(1)
    top = m.amax(0)
    first = (m == top).to(torch.int8).argmax(0)  # the lowest code range holding the maximum: lowest index on ties
    ind = ind.gather(0, first[None]).squeeze(0).masked_fill_(nan.amax(0) > 0, -1)
    shift = m - top
    scale = shift.exp()
    s1 = (s1 * scale).sum(0)
    pc = (pc * scale[:, :, None]).sum(0) / s1[:, None]
    top = top.masked_fill(ind < 0, float("nan"))
    if not entropy:
        zeros = torch.zeros_like(top)
        return ind, torch.stack([top, s1.log(), zeros, zeros], 1), pc, None
    a_t = (shift / temperature).exp()
    w_t = (a_t * (w_t + shift * s_t)).sum(0)
    log_t = (a_t * s_t).sum(0).log()
    stats = torch.stack([top, s1.log(), log_t, log_t - w_t / (temperature * log_t.exp())], 1)
    out = zr.new_empty(p.row_splits, p.k)
    scale = 1.0 / p.n if p.row_splits == 1 else 1.0
    _column_kernel[(p.code_tiles, p.row_splits)](
        zr, cb, stats, out, p.n, p.k, p.d, p.rows_per_split, 1.0 / temperature, scale, BLOCK_N=p.rows,
        BLOCK_K=p.codes, **p.launch)
    return ind, stats, pc, out[0] if p.row_splits == 1 else reduce_rows(out, 1.0 / p.n)


def _backward(zr, cb, g, g_hard, ind, stats, delta, d_avg, c_s, temperature, exact_tf32=False):
    """rho (with a batch-average gradient), then dz and dC, each from partials over ranges summed in order."""
    p = _Plan(zr, cb, exact_tf32)
    has_s, has_a = c_s is not None, d_avg is not None
    inv_t = 1.0 / temperature
    if has_a:
        rho = zr.new_empty(p.code_splits, p.n)
        _rho_kernel[(p.row_tiles, p.code_splits)](
            zr, cb, stats, d_avg, rho, p.n, p.k, p.d, p.codes_per_split, inv_t, BLOCK_M=p.rows, BLOCK_K=p.codes,
            **p.launch)
        rho = rho.sum(0)
    else:
        rho = d_avg = delta  # stand-ins: the kernels never read them
    args = (stats, delta, rho, d_avg)
    scalars = (inv_t, float(c_s) if has_s else 0.0, 1.0 / (p.n * temperature))
    flags = dict(HAS_S=has_s, HAS_A=has_a, **p.launch)
    dz = zr.new_empty(p.code_splits, p.n, p.d)
    _dz_kernel[(p.row_tiles, p.code_splits, p.parts)](
        zr, cb, g, *args, dz, p.n, p.k, p.d, p.codes_per_split, *scalars, BLOCK_M=p.rows, BLOCK_K=p.codes,
        BLOCK_O=p.block_o, **flags)
    dc = zr.new_empty(p.row_splits, p.k, p.d)
    _dc_kernel[(p.code_tiles, p.row_splits, p.dc_parts)](
        zr, cb, g, g_hard, ind, *args, dc, p.n, p.k, p.d, p.rows_per_split, *scalars, BLOCK_N=p.rows,
        BLOCK_K=p.codes, BLOCK_O=p.dc_block_o, **flags)
    return dz.sum(0), dc.sum(0)


PASSES = reference.CodePasses(_forward, _backward)
_EXACT_TF32_PASSES = reference.CodePasses(lambda *a: _forward(*a, exact_tf32=True),
                                          lambda *a: _backward(*a, exact_tf32=True))


def _delegated(z, codebook) -> bool:
    return torch.float64 in (z.dtype, codebook.dtype) or codebook.shape[1] > MAX_D


def _passes(z, codebook) -> reference.CodePasses:
    """16-bit inputs: their float32 copies are exact in tf32, so the logits need one tensor-core product."""
    return _EXACT_TF32_PASSES if z.element_size() == 2 and codebook.element_size() == 2 else PASSES


def ibq_forward(z, codebook, dim, beta, temperature, entropy):
    if _delegated(z, codebook):
        return reference.ibq_forward(z, codebook, dim, beta, temperature, entropy)
    return reference.forward(_passes(z, codebook), z, codebook, dim, beta, temperature, entropy)


def ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    if _delegated(z, codebook):
        return reference.ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta,
                                      temperature)
    return reference.backward(_passes(z, codebook), dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim,
                              beta, temperature)
