"""Index backpropagation quantization (IBQ) with MAGVIT-v2's entropy terms, in plain PyTorch, blocked over rows.

Notation: rows z (N, D), codes C (K, D), logits L = z C^T (no scale), P = softmax(L), p = softmax(L / T),
e = C[argmax L]. The quantized value is e; its gradient g reaches L through P (softmax-attention backward with
queries z and keys = values = C): dL = P * (g C^T - delta), delta_i = g_i . (P C)_i, and every code through the
hard one-hot too (dC += one_hot^T g). The entropies add to dL: the per-sample entropy S = mean_i H(p_i) gives
-(dS / (N T)) p (log p + H), anything computed from the batch average a_k = mean_i p_ik with gradient d_a gives
(1 / (N T)) p (d_a - rho), rho_i = sum_k p_ik d_a_k.
Per row everything reduces to a few scalars (max and argmax of L, both log-normalisers, H) and P C, so no (N, K)
tensor exists: a block of rows holds every code's logit, at most _TILE_ELEMENTS of them. The forward is one pass
(two GEMMs: L and P C; a accumulates over the blocks) and the backward one more (four: L, dP, dL C and dL^T z;
rho comes from the block's whole rows), six N K D multiply-adds in all with the entropy.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .gaussian import acc_dtype
from .vq import _slots, index_shape, rows, unrows

_TILE_ELEMENTS = 1 << 23  # codes x rows per tile (three such tiles are alive in the backward)


def row_blocks(n: int, k: int) -> tuple[list[slice], int]:
    """(slices of rows, rows per slice) such that a block of k codes x rows stays within _TILE_ELEMENTS."""
    step = max(1, min(n, _TILE_ELEMENTS // max(k, 1)))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)], step


def _exp(t, out):
    """exp(t) into out (which may be t), the arguments clamped at 1 + log(smallest normal): the vectorised exp takes
    a slow path, ten to twenty times as long, near and below that log (at T = 0.01 most of (L - m) / T lies there),
    and the results it lifts are below 3.2e-38 in float32, nothing next to the normalisers, which are at least 1."""
    return torch.clamp(t, min=math.log(torch.finfo(t.dtype).tiny) + 1.0, out=out).exp_()


def _tile(buf, k, rows):
    """A (k, rows) matrix on the front of a reused flat buffer (no fresh pages per block)."""
    return buf[:k * rows].view(k, rows)


def _forward(zr, cb, temperature, entropy):
    """(indices (N,) with -1 for NaN rows, stats (N, 4), P C (N, D), a (K,) or None): per block of rows, one GEMM
    gives every code's logit (codes x rows, so that the GEMM runs along the long code axis), and the max, argmax,
    both normalisers, H, P C and the block's share of a follow from it. stats = [m = max L, log sum exp(L - m),
    log sum exp((L - m) / T), H(p)]: log P = L - m - stats[1] and log p = (L - m) / T - stats[2], with no
    cancellation of large logits (L / T and its logsumexp would each carry float32 rounding of their size)."""
    n, k = zr.shape[0], cb.shape[0]
    blocks, step = row_blocks(n, k)
    ind = torch.empty(n, dtype=torch.int64, device=zr.device)
    stats = zr.new_zeros(n, 4)
    pc = torch.empty_like(zr)
    avg = zr.new_zeros(k) if entropy else None
    buf_l, buf_e = zr.new_empty(k * step), zr.new_empty(k * step)
    for blk in blocks:
        nb = blk.stop - blk.start
        lt = torch.mm(cb, zr[blk].t(), out=_tile(buf_l, k, nb))
        m, arg = lt.max(0)  # the first maximum: the lowest index wins ties; NaN wins (and is flagged below)
        centred = lt.sub_(m)
        e = _exp(centred, out=_tile(buf_e, k, nb))
        s1 = e.sum(0)
        torch.mm(e.t(), cb, out=pc[blk]).div_(s1[:, None])
        ind[blk] = arg.masked_fill_(m.isnan(), -1)
        stats[blk, 0], stats[blk, 1] = m, s1.log()
        if entropy:  # e = exp((L - m) / T); H = log s_t - sum e (L - m) / (T s_t)
            e = _exp(torch.div(centred, temperature, out=e), out=e)
            s_t = e.sum(0)
            avg.addmv_(e, s_t.reciprocal())
            log_t = s_t.log()
            stats[blk, 2], stats[blk, 3] = log_t, log_t - centred.mul_(e).sum(0) / (temperature * s_t)
    return ind, stats, pc, None if avg is None else avg.div_(n)


def _backward(zr, cb, g, g_hard, ind, stats, delta, d_avg, c_s, temperature):
    """(dz, dC) through the logits (dL as in the module docstring, c_s = dS / (N T); d_avg None without a
    batch-average gradient, c_s None without a per-sample-entropy gradient), plus one_hot^T g_hard to dC. Per block
    of rows, one GEMM gives L and dP = g C^T side by side; rho needs the whole row of p, which the block holds."""
    n, k = zr.shape[0], cb.shape[0]
    blocks, step = row_blocks(n, k)
    dz = torch.empty_like(zr)
    dc = cb.new_zeros(k + 1, cb.shape[1])  # an extra slot for the hard path's index -1
    buf_y, buf_p = zr.new_empty(2 * k * step), zr.new_empty(k * step)
    for blk in blocks:
        nb = blk.stop - blk.start
        y = torch.mm(cb, torch.cat([zr[blk], g[blk]]).t(), out=_tile(buf_y, k, 2 * nb))
        centred, dl = y[:, :nb].sub_(stats[blk, 0]), y[:, nb:]
        p = _tile(buf_p, k, nb)
        p = _exp(torch.sub(centred, stats[blk, 1], out=p), out=p)
        dl.sub_(delta[blk]).mul_(p)  # P (dP - delta)
        if c_s is not None or d_avg is not None:
            log_p = centred.div_(temperature).sub_(stats[blk, 2])
            p = _exp(log_p, out=p)
            rho = None if d_avg is None else torch.mv(p.t(), d_avg)
            if c_s is not None:
                dl.sub_(log_p.add_(stats[blk, 3]).mul_(p).mul_(c_s))
            if rho is not None:
                dl.addcmul_(p, torch.sub(d_avg[:, None], rho, out=centred), value=1.0 / (n * temperature))
        torch.mm(dl.t(), cb, out=dz[blk])
        dc[:k].addmm_(dl, zr[blk])
    return dz, dc.index_put_((_slots(ind, k),), g_hard, accumulate=True)[:k]


class CodePasses(NamedTuple):
    """A backend's passes over the codes (the rest of IBQ is O(N D + K D) PyTorch shared through `forward` and
    `backward`). zr (N, D) and cb (K, D): contiguous, in the accumulation dtype.
    forward(zr, cb, temperature, entropy) -> (indices, stats, P C, a or None);
    backward(zr, cb, g, g_hard, ind, stats, delta, d_avg, c_s, temperature) -> (dz, dC)."""
    forward: Callable
    backward: Callable


PASSES = CodePasses(_forward, _backward)


def _inputs(z, codebook, dim):
    """(rows of z, codebook), contiguous, in the accumulation dtype of both."""
    acc = acc_dtype(torch.promote_types(z.dtype, codebook.dtype))
    return rows(z, dim).to(acc).contiguous(), codebook.to(acc).contiguous()


def _codes(cb, ind):
    """e = C[ind], NaN rows for index -1."""
    return cb[ind.clamp(min=0)].masked_fill_((ind < 0)[:, None], float("nan"))


def forward(passes, z, codebook, dim, beta, temperature, entropy):
    """ibq_forward with the code passes of `passes`."""
    zr, cb = _inputs(z, codebook, dim)
    ind, stats, pc, avg = passes.forward(zr, cb, temperature, entropy)
    e = _codes(cb, ind)
    quant_loss = (e - zr).square().sum() * ((2.0 + beta) / zr.numel())
    ps = stats[:, 3].mean() if entropy else None
    return (unrows(e.to(z.dtype), z, dim), ind.view(index_shape(z, dim)), avg, ps, quant_loss, stats, pc)


def backward(passes, dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    """ibq_backward with the code passes of `passes`."""
    zr, cb = _inputs(z, codebook, dim)
    n = zr.shape[0]
    ind = indices.reshape(-1)
    g = torch.zeros_like(zr) if dq is None else rows(dq, dim).to(zr.dtype)
    dz = torch.zeros_like(zr)
    g_hard = g
    if d_quant is not None:  # (2 + beta) mean((e - z)^2): 2 (e - z) / M through z_q, 2 beta through the hard code
        diff = (_codes(cb, ind) - zr) * (2.0 * d_quant.to(zr.dtype) / zr.numel())
        g = g + diff
        g_hard = g + beta * diff
        dz -= 2.0 * diff
    delta = (g * pc).sum(1)
    c_s = None if d_ps is None else d_ps.to(zr.dtype) / (n * temperature)
    dz_l, dc = passes.backward(zr, cb, g, g_hard, ind, stats, delta, None if d_avg is None else d_avg.to(zr.dtype),
                               c_s, temperature)
    return unrows((dz + dz_l).to(z.dtype), z, dim), dc.to(codebook.dtype)


def ibq_forward(z, codebook, dim, beta, temperature, entropy):
    return forward(PASSES, z, codebook, dim, beta, temperature, entropy)


def ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    return backward(PASSES, dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature)
