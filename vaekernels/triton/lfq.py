"""Triton kernels for the code passes of lookup-free quantization (vaekernels.reference.lfq's CodeStreams).

Every pass builds tiles of log p(c | x) = log A[n, high] + log L[n, low] from per-bit log-sigmoids (sums of
log-probabilities: no cancellation, unlike <x, c> minus a log-normaliser), so nothing tokens x codes leaves
registers:
- the average: a program owns a (high tile x low tile) block of codes and a range of tokens and accumulates
  A^T L on tensor cores (float32 operands split in three tf32 products, about float32 accuracy); token ranges
  give partial sums that a second pass adds in a fixed order;
- the clamped entropy and the gradient: a program owns a tile of tokens and sweeps every code, accumulating per
  token -sum p log max(p, eps), or S1_k, S0_k = sum_c p_c G_c [bit k of c = 1], [= 0] (then
  dw = S1 sigmoid(-w) - S0 sigmoid(w) on the host side, O(N K)).
No float atomics: every sum has one owner and a fixed order. float64 goes to the reference backend.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..reference import lfq as reference
from ._common import reduce_rows

_PRECISION = "tf32x3"  # float32 operands as three tf32 products: tensor cores at about float32 accuracy
_SPLIT_PROGRAMS = 1024  # the average splits tokens into ranges until about this many programs run


@triton.jit
def _log_table(lo_ptr, hi_ptr, row, row_ok, codes, FIRST: tl.constexpr, NBITS: tl.constexpr):
    """log P(bits FIRST .. FIRST + NBITS - 1 of the token equal those of `codes`, most significant first):
    (tokens, codes) sums of the per-bit log-sigmoids lo = log sigmoid(-w), hi = log sigmoid(w)."""
    acc = tl.zeros((row.shape[0], codes.shape[0]), dtype=tl.float32)
    for j in tl.static_range(NBITS):
        lo = tl.load(lo_ptr + row + FIRST + j, mask=row_ok, other=0.0)
        hi = tl.load(hi_ptr + row + FIRST + j, mask=row_ok, other=0.0)
        bit = (codes >> (NBITS - 1 - j)) & 1
        acc += tl.where(bit[None, :] != 0, hi[:, None], lo[:, None])
    return acc


@triton.jit
def _average_kernel(lo_ptr, hi_ptr, out_ptr, N, G, tokens_per_split, scale, K: tl.constexpr, K1: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    """out[split, g, high * 2^K2 + low] = scale * sum over the split's tokens of A[n, high] L[n, low]."""
    K2: tl.constexpr = K - K1
    hs = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    ls = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    g = tl.program_id(2) % G
    split = tl.program_id(2) // G
    start = split * tokens_per_split
    stop = tl.minimum(start + tokens_per_split, N)
    acc = tl.zeros((BLOCK_H, BLOCK_L), dtype=tl.float32)
    for n0 in range(start, stop, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        ok = ns < stop
        row = (ns.to(tl.int64) * G + g) * K  # int64: N * groups * K may pass 2^31
        a = tl.where(ok[:, None], tl.exp(_log_table(lo_ptr, hi_ptr, row, ok, hs, 0, K1)), 0.0)
        low = tl.exp(_log_table(lo_ptr, hi_ptr, row, ok, ls, K1, K2))
        acc = tl.dot(tl.trans(a), low, acc, input_precision=PRECISION)
    mask = (hs[:, None] < (1 << K1)) & (ls[None, :] < (1 << K2))
    codes = hs[:, None] * (1 << K2) + ls[None, :]
    tl.store(out_ptr + (split * G + g).to(tl.int64) * (1 << K) + codes, acc * scale, mask=mask)


@triton.jit
def _bit_sums(s1, s0, by_code, codes, NBITS: tl.constexpr, KP: tl.constexpr):
    """s1, s0 (tokens, KP) plus sum over `codes` of by_code (tokens, codes) where bit j of the code is 1, 0."""
    j = tl.arange(0, KP)
    bit = (codes[:, None] >> tl.where(j < NBITS, NBITS - 1 - j, 0)[None, :]) & 1
    real = (j < NBITS)[None, :]
    one = tl.where(real & (bit != 0), 1.0, 0.0)
    zero = tl.where(real & (bit == 0), 1.0, 0.0)
    s1 += tl.sum(by_code[:, :, None] * one[None, :, :], axis=1)
    s0 += tl.sum(by_code[:, :, None] * zero[None, :, :], axis=1)
    return s1, s0


@triton.jit
def _store_bits(ptr, row, row_ok, s, FIRST: tl.constexpr, NBITS: tl.constexpr, KP: tl.constexpr):
    j = tl.arange(0, KP)
    tl.store(ptr + row[:, None] + FIRST + j[None, :], s, mask=row_ok[:, None] & (j[None, :] < NBITS))


@triton.jit
def _token_kernel(lo_ptr, hi_ptr, weight_ptr, ps_weight_ptr, out_ptr, s1_ptr, s0_ptr, N, G, log_eps,
                  K: tl.constexpr, K1: tl.constexpr, GRADIENT: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                  CLAMPED: tl.constexpr, KP1: tl.constexpr, KP2: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_L: tl.constexpr):
    """Per token of the program's tile, over every code: without GRADIENT, out[n, g] = -sum p log max(p, eps);
    with it, s1/s0[n, g, k] = sum_c p_c G_c [bit k of c = 1 / 0], G_c = weight[g, c] (HAS_WEIGHT) +
    ps_weight * (-max(log p, log eps) - [p >= eps]) (CLAMPED)."""
    K2: tl.constexpr = K - K1
    ns = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    g = tl.program_id(1)
    ok = ns < N
    row = (ns.to(tl.int64) * G + g) * K  # int64: N * groups * K may pass 2^31
    entropy = tl.zeros((BLOCK_N,), dtype=tl.float32)
    s1_high = tl.zeros((BLOCK_N, KP1), dtype=tl.float32)
    s0_high = tl.zeros((BLOCK_N, KP1), dtype=tl.float32)
    s1_low = tl.zeros((BLOCK_N, KP2), dtype=tl.float32)
    s0_low = tl.zeros((BLOCK_N, KP2), dtype=tl.float32)
    ps_weight = tl.load(ps_weight_ptr)  # (a valid address when not CLAMPED, then unused)
    for l0 in range(0, 1 << K2, BLOCK_L):  # low codes outside: their table is built once per tile, the high one
        ls = l0 + tl.arange(0, BLOCK_L)    # (K1 <= K2 bits, BLOCK_H << BLOCK_L codes) in the inner loop
        l_ok = ls < (1 << K2)
        log_l = _log_table(lo_ptr, hi_ptr, row, ok, ls, K1, K2)
        low = tl.where(ok[:, None] & l_ok[None, :], tl.exp(log_l), 0.0)  # p = A L: exps per table entry, not pair
        # this low tile's sums, added to the totals once (shorter float32 chains than one add per code tile)
        by_low = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
        tile_entropy = tl.zeros((BLOCK_N,), dtype=tl.float32)
        tile_s1 = tl.zeros((BLOCK_N, KP1), dtype=tl.float32)
        tile_s0 = tl.zeros((BLOCK_N, KP1), dtype=tl.float32)
        for h0 in range(0, 1 << K1, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            h_ok = hs < (1 << K1)
            log_a = _log_table(lo_ptr, hi_ptr, row, ok, hs, 0, K1)
            p = tl.where(h_ok[None, :], tl.exp(log_a), 0.0)[:, :, None] * low[:, None, :]
            logp = log_a[:, :, None] + log_l[:, None, :]
            clamped = tl.maximum(logp, log_eps)
            if GRADIENT:
                per_code = tl.zeros((BLOCK_N, BLOCK_H, BLOCK_L), dtype=tl.float32)
                if HAS_WEIGHT:
                    codes = hs[:, None] * (1 << K2) + ls[None, :]
                    per_code += tl.load(weight_ptr + g.to(tl.int64) * (1 << K) + codes,
                                        mask=h_ok[:, None] & l_ok[None, :], other=0.0)[None, :, :]
                if CLAMPED:
                    per_code -= ps_weight * (clamped + tl.where(logp >= log_eps, 1.0, 0.0))
                p_g = p * per_code
                by_low += tl.sum(p_g, axis=1)
                tile_s1, tile_s0 = _bit_sums(tile_s1, tile_s0, tl.sum(p_g, axis=2), hs, K1, KP1)
            else:
                tile_entropy -= tl.sum(tl.sum(p * clamped, axis=2), axis=1)
        if GRADIENT:
            s1_high += tile_s1
            s0_high += tile_s0
            s1_low, s0_low = _bit_sums(s1_low, s0_low, by_low, ls, K2, KP2)
        else:
            entropy += tile_entropy
    if GRADIENT:
        _store_bits(s1_ptr, row, ok, s1_high, 0, K1, KP1)
        _store_bits(s0_ptr, row, ok, s0_high, 0, K1, KP1)
        _store_bits(s1_ptr, row, ok, s1_low, K1, K2, KP2)
        _store_bits(s0_ptr, row, ok, s0_low, K1, K2, KP2)
    else:
        tl.store(out_ptr + ns.to(tl.int64) * G + g, entropy, mask=ok)


def _log_sigmoids(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sigmoid(-w), log sigmoid(w)) as contiguous float32: the per-bit log-probabilities of 0 and 1."""
    w = w.float()
    return torch.nn.functional.logsigmoid(-w).contiguous(), torch.nn.functional.logsigmoid(w).contiguous()


def _tile(bits: int, cap: int) -> int:
    return min(cap, 1 << bits)


def _average(w: torch.Tensor) -> torch.Tensor:
    n, groups, k = w.shape
    k1, k2 = reference._split(k)
    lo, hi = _log_sigmoids(w)
    block_n = 32  # tl.dot takes tiles of at least 16 on every side: smaller code ranges are masked
    block_h, block_l = max(16, _tile(k1, 64)), max(16, _tile(k2, 64))
    code_tiles = triton.cdiv(1 << k1, block_h) * triton.cdiv(1 << k2, block_l) * groups
    splits = max(1, min(triton.cdiv(n, block_n), _SPLIT_PROGRAMS // code_tiles))
    per_split = triton.cdiv(triton.cdiv(n, splits), block_n) * block_n
    splits = triton.cdiv(n, per_split)
    out = lo.new_empty(splits, groups, 1 << k)
    grid = (triton.cdiv(1 << k1, block_h), triton.cdiv(1 << k2, block_l), splits * groups)
    _average_kernel[grid](lo, hi, out, n, groups, per_split, 1.0 / n if splits == 1 else 1.0, K=k, K1=k1, num_warps=8,
                          PRECISION=_PRECISION, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_L=block_l)
    if splits == 1:
        return out[0]
    return reduce_rows(out.view(splits, -1), 1.0 / n).view(groups, 1 << k)


def _token_pass(w, weight, ps_weight, eps, gradient):
    """_token_kernel over every token tile and group: (N, groups) entropies, or the (N, groups, K) s1, s0."""
    n, groups, k = w.shape
    k1, k2 = reference._split(k)
    lo, hi = _log_sigmoids(w)
    block_n, block_h, block_l = 16, _tile(k1, 4), _tile(k2, 16)
    entropy = lo.new_empty(0 if gradient else n * groups)
    s1, s0 = (torch.empty_like(lo), torch.empty_like(lo)) if gradient else (entropy, entropy)
    weight = lo if weight is None else weight.float().contiguous()
    ps = lo if ps_weight is None else ps_weight.float().reshape(1)
    _token_kernel[(triton.cdiv(n, block_n), groups)](
        lo, hi, weight, ps, entropy, s1, s0, n, groups, math.log(eps), K=k, K1=k1, GRADIENT=gradient,
        HAS_WEIGHT=weight is not lo, CLAMPED=ps is not lo, KP1=triton.next_power_of_2(max(k1, 1)),
        KP2=triton.next_power_of_2(k2), BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_L=block_l)
    return (s1, s0) if gradient else entropy


def _clamped_entropy(w: torch.Tensor, eps: float) -> torch.Tensor:
    return _token_pass(w, None, None, eps, gradient=False).sum()


def _gradient(w, weight, ps_weight, eps):
    s1, s0 = _token_pass(w, weight, ps_weight, eps, gradient=True)
    return s1 * torch.sigmoid(-w) - s0 * torch.sigmoid(w)


STREAMS = reference.CodeStreams(_average, _clamped_entropy, _gradient)


def lfq_forward(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps):
    if x.dtype == torch.float64:
        return reference.lfq_forward(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps)
    return reference.forward(STREAMS, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped,
                             eps)


def lfq_backward(dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks,
                 clamped, eps):
    if x.dtype == torch.float64:
        return reference.lfq_backward(dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical,
                                      num_codebooks, clamped, eps)
    return reference.backward(STREAMS, dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical,
                              num_codebooks, clamped, eps)
