"""Index backpropagation quantization (IBQ) with MAGVIT-v2's entropy terms, in plain PyTorch, blocked over codes.

Notation: rows z (N, D), codes C (K, D), logits L = z C^T (no scale), P = softmax(L), p = softmax(L / T),
e = C[argmax L]. The quantized value is e; its gradient g reaches L through P (softmax-attention backward with
queries z and keys = values = C): dL = P * (g C^T - delta), delta_i = g_i . (P C)_i, and every code through the
hard one-hot too (dC += one_hot^T g). The entropies add to dL: the per-sample entropy S = mean_i H(p_i) gives
-(dS / (N T)) p (log p + H), anything computed from the batch average a_k = mean_i p_ik with gradient d_a gives
(1 / (N T)) p (d_a - rho), rho_i = sum_k p_ik d_a_k.
Per row everything reduces to a few scalars (max and argmax of L, both log-normalisers, H) and P C, all folded
over code blocks with online rescaling, so no (N, K) tensor exists: a tile holds at most _TILE_ELEMENTS logits.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .gaussian import acc_dtype
from .vq import _slots, index_shape, rows, scatter_rows, unrows

_TILE_ELEMENTS = 1 << 20  # rows x codes per tile


def code_blocks(n: int, k: int):
    """Slices of codes such that a block of n rows x codes stays within _TILE_ELEMENTS."""
    step = max(1, min(k, _TILE_ELEMENTS // max(n, 1)))
    for start in range(0, k, step):
        yield slice(start, min(start + step, k))


def _sweep(zr, cb, temperature, entropy):
    """(indices (N,) with -1 for NaN rows, stats (N, 4), P C (N, D)), with running max, normalisers and P C
    rescaled as the max grows (the flash-attention forward). stats = [m = max L, log sum exp(L - m),
    log sum exp((L - m) / T), H(p)]: log P = L - m - stats[1] and log p = (L - m) / T - stats[2], with no
    cancellation of large logits (L / T and its logsumexp would each carry float32 rounding of their size)."""
    n = zr.shape[0]
    m = None
    nan = torch.zeros(n, dtype=torch.bool, device=zr.device)
    for blk in code_blocks(n, cb.shape[0]):
        logits = zr @ cb[blk].t()
        nan |= logits.isnan().any(1)
        bm, barg = logits.max(1)  # the first maximum of the block: the lowest index wins ties
        if m is None:
            m, ind = bm.clone(), barg + blk.start
            s1, s_t, w_t, pc = (zr.new_zeros(n), zr.new_zeros(n), zr.new_zeros(n), torch.zeros_like(zr))
        ind = torch.where(bm > m, barg + blk.start, ind)  # strictly greater: earlier blocks win ties
        new = torch.maximum(m, bm)
        shift = m - new
        e1 = (logits - new[:, None]).exp_()
        s1 = s1 * shift.exp() + e1.sum(1)
        pc = pc * shift.exp()[:, None] + e1 @ cb[blk]
        if entropy:  # s_t = sum exp((L - m) / T), w_t = sum exp((L - m) / T) (L - m), both relative to the max m
            a_t = (shift / temperature).exp()
            centred = logits - new[:, None]
            e_t = (centred / temperature).exp_()
            w_t = a_t * (w_t + shift * s_t) + (e_t * centred).sum(1)
            s_t = a_t * s_t + e_t.sum(1)
        m = new
    log_t = s_t.log() if entropy else torch.zeros_like(m)
    h = log_t - w_t / (temperature * s_t) if entropy else torch.zeros_like(m)
    stats = torch.stack([m, s1.log(), log_t, h], 1)
    return ind.masked_fill_(nan, -1), stats, pc / s1[:, None]


def _log_p(logits, stats, temperature):
    """log softmax(L / T) of a block of logits, in place."""
    return logits.sub_(stats[:, 0:1]).div_(temperature).sub_(stats[:, 2:3])


def _column_sums(zr, cb, stats, temperature):
    """(K,) a_k = mean over rows of p_ik."""
    avg = zr.new_empty(cb.shape[0])
    for blk in code_blocks(zr.shape[0], cb.shape[0]):
        avg[blk] = _log_p(zr @ cb[blk].t(), stats, temperature).exp_().sum(0)
    return avg.div_(zr.shape[0])


def _rho(zr, cb, stats, temperature, d_avg):
    """(N,) rho_i = sum_k p_ik d_avg_k."""
    rho = zr.new_zeros(zr.shape[0])
    for blk in code_blocks(zr.shape[0], cb.shape[0]):
        rho += _log_p(zr @ cb[blk].t(), stats, temperature).exp_() @ d_avg[blk]
    return rho


def _gradients(zr, cb, g, g_hard, ind, stats, delta, rho, d_avg, c_s, temperature):
    """(dz, dC) through the logits (dL as in the module docstring, c_s = dS / (N T); rho and d_avg None without
    a batch-average gradient, c_s None without a per-sample-entropy gradient), plus one_hot^T g_hard to dC."""
    n = zr.shape[0]
    dz = torch.zeros_like(zr)
    dc = torch.empty_like(cb)
    for blk in code_blocks(n, cb.shape[0]):
        logits = zr @ cb[blk].t()
        dl = (logits - stats[:, 0:1] - stats[:, 1:2]).exp_().mul_(g @ cb[blk].t() - delta[:, None])
        if c_s is not None or rho is not None:
            logp = _log_p(logits, stats, temperature)
            p = logp.exp()
            if c_s is not None:
                dl -= c_s * p * (logp + stats[:, 3:4])
            if rho is not None:
                dl += p * (d_avg[blk][None, :] - rho[:, None]) / (n * temperature)
        dz += dl @ cb[blk]
        dc[blk] = dl.t() @ zr
    return dz, dc + scatter_rows(_slots(ind, cb.shape[0]), g_hard, cb.shape[0] + 1)[:-1]


class CodePasses(NamedTuple):
    """A backend's passes over the codes (the rest of IBQ is O(N D + K D) PyTorch shared through `forward` and
    `backward`). zr (N, D) and cb (K, D): contiguous, in the accumulation dtype.
    sweep(zr, cb, temperature, entropy) -> (indices, stats, P C); column_sums(zr, cb, stats, temperature) -> (K,);
    rho(zr, cb, stats, temperature, d_avg) -> (N,); gradients(zr, cb, g, g_hard, ind, stats, delta, rho, d_avg, c_s,
    temperature) -> (dz, dC)."""
    sweep: Callable
    column_sums: Callable
    rho: Callable
    gradients: Callable


PASSES = CodePasses(_sweep, _column_sums, _rho, _gradients)


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
    ind, stats, pc = passes.sweep(zr, cb, temperature, entropy)
    e = _codes(cb, ind)
    quant_loss = (e - zr).square().sum() * ((2.0 + beta) / zr.numel())
    avg = passes.column_sums(zr, cb, stats, temperature) if entropy else None
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
    rho = None if d_avg is None else passes.rho(zr, cb, stats, temperature, d_avg.to(zr.dtype))
    c_s = None if d_ps is None else d_ps.to(zr.dtype) / (n * temperature)
    dz_l, dc = passes.gradients(zr, cb, g, g_hard, ind, stats, delta, rho,
                                None if d_avg is None else d_avg.to(zr.dtype), c_s, temperature)
    return unrows((dz + dz_l).to(z.dtype), z, dim), dc.to(codebook.dtype)


def ibq_forward(z, codebook, dim, beta, temperature, entropy):
    return forward(PASSES, z, codebook, dim, beta, temperature, entropy)


def ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    return backward(PASSES, dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature)
