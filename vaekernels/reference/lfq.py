"""Lookup-free / binary spherical quantization with the exact entropy terms, in plain PyTorch, blocked over codes.

Notation (per token n and group g of K channels): x~ is x (or s * x / ||x|| with `spherical`), the codes are
{-sigma, +sigma}^K with sigma = s (or s / sqrt(K)), and w = 4 * inv_temperature * sigma * x~ (twice the per-bit
logit). p(c | x) = softmax_c(2 * inv_temperature * <x~, c>) factorizes per bit:

    log p(c | x) = sum_k log sigmoid(-w_k) + <bits(c), w>          bits(c) in {0, 1}^K, most significant first

so a tile of log-probabilities for all tokens is one (N x K) @ (K x T) product plus a per-token constant, and
- the exact per-sample entropy is sum_k h(sigmoid(w_k)) (binary entropies), O(K) per token;
- the clamped one, -sum_c p log max(p, eps), needs only the codes with p >= eps (the rest enter through
  their total mass): per token, the high-bit codes whose bound log A + max log L passes log eps (a few for
  peaked distributions, all of them for flat ones) expand to their 2^K2 codes (`_clamped_blocks`);
- avg_c = mean_n p(c | x_n), the 2^K vector the codebook entropy needs, streams over code tiles;
- the backward of anything computed from avg (gradient g = d loss / d avg) is, per token,
  d/dw_k = S1_k - sigmoid(w_k) * S0 with S1 = sum_c p_c W_c bits(c), S0 = sum_c p_c W_c, W_c = g_c / N, again one
  streamed pass: (N x T) @ (T x K) per tile.
Extra memory is O(N * K + 2^K) plus one tile of at most _TILE_ELEMENTS log-probabilities (and its exp); the clamped
entropy's tiles, per-block tables and kept-pair lists hold at most a quarter of that each.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch

from .gaussian import acc_dtype

_TILE_ELEMENTS = 1 << 20  # tokens x codes per tile
_NORM_EPS = 1e-12  # F.normalize's


def tokens(x: torch.Tensor, dim: int, groups: int) -> torch.Tensor:
    """x with axis `dim` moved last and split into groups: (N, groups, K) in the accumulation dtype (a copy
    unless x is already channel-last in that dtype; never written to)."""
    xt = x.movedim(dim, -1)
    c = xt.shape[-1]
    return xt.reshape(-1, groups, c // groups).to(acc_dtype(x.dtype))


def untokens(t: torch.Tensor, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `tokens`: (N, groups, K) back to x's shape, layout and dtype (contiguous)."""
    return t.reshape(x.movedim(dim, -1).shape).movedim(-1, dim).to(x.dtype).contiguous()


def code_value(k: int, codebook_scale: float, spherical: bool) -> float:
    """sigma: the magnitude of every code coordinate."""
    return codebook_scale / math.sqrt(k) if spherical else codebook_scale


def normalized(xg: torch.Tensor, codebook_scale: float, spherical: bool):
    """(x~, ||x|| clamped as F.normalize clamps it, or None without `spherical`)."""
    if not spherical:
        return xg, None
    r = xg.norm(dim=-1, keepdim=True).clamp_min_(_NORM_EPS)
    return xg / r * codebook_scale, r


def bits(start: int, stop: int, k: int, dtype, device) -> torch.Tensor:
    """(stop - start, K) bits of the codes start..stop-1, most significant first, as 0/1 in `dtype`."""
    codes = torch.arange(start, stop, device=device)
    shifts = torch.arange(k - 1, -1, -1, device=device)
    return ((codes[:, None] >> shifts) & 1).to(dtype)


def _split(k: int) -> tuple[int, int]:
    """(K1, K2): the high (most significant) and low bits of a code; code = high * 2^K2 + low."""
    return k // 2, k - k // 2


def _block(n: int, width: int) -> int:
    """Tokens per block so that a block of `width` values per token stays within _TILE_ELEMENTS."""
    return max(1, min(n, _TILE_ELEMENTS // max(width, 1)))


def factor(w: torch.Tensor, log: bool = False) -> torch.Tensor:
    """(N, 2^k) probabilities of every assignment of the k bits whose logits are w (N, k), most significant first:
    products of sigmoid(+-w) built bit by bit (no cancellation); with log=True their logs (sums of log sigmoids)."""
    out = w.new_zeros(w.shape[0], 1) if log else w.new_ones(w.shape[0], 1)
    for j in range(w.shape[1]):
        wj = w[:, j:j + 1]
        if log:
            lo, hi = -torch.nn.functional.softplus(wj), -torch.nn.functional.softplus(-wj)
            out = torch.stack([out + lo, out + hi], dim=-1).flatten(1)
        else:
            out = torch.stack([out * torch.sigmoid(-wj), out * torch.sigmoid(wj)], dim=-1).flatten(1)
    return out


def _bit_grad(table_grad: torch.Tensor, table: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """d/dw of sum(table_grad * table) for table = factor(w): sum_c G_c T_c (bits(c) - sigmoid(w))."""
    gt = table_grad * table
    return gt @ bits(0, gt.shape[1], w.shape[1], w.dtype, w.device) - torch.sigmoid(w) * gt.sum(1, keepdim=True)


def _binary_entropy(w: torch.Tensor) -> torch.Tensor:
    """h(sigmoid(w)) elementwise: sigmoid(w) softplus(-w) + sigmoid(-w) softplus(w)."""
    sp = torch.nn.functional.softplus
    return torch.sigmoid(w) * sp(-w) + torch.sigmoid(-w) * sp(w)


def _dense_tiles(log_a: torch.Tensor, log_l: torch.Tensor, budget: int):
    """(None, high code slice, logp (block, highs, 2^K2)) over tiles of every code of a token block."""
    per_tile = max(1, budget // (log_a.shape[0] * log_l.shape[1]))
    for h0 in range(0, log_a.shape[1], per_tile):
        high = slice(h0, h0 + per_tile)
        yield None, high, log_a[:, high, None] + log_l[:, None, :]


def _pair_tiles(log_a: torch.Tensor, log_l: torch.Tensor, pairs: torch.Tensor, budget: int):
    """(t, h, logp (pairs, 2^K2)) over tiles of the (token, high) pairs (P, 2), in their order."""
    per_tile = max(1, budget // log_l.shape[1])
    for c0 in range(0, pairs.shape[0], per_tile):
        t, h = pairs[c0:c0 + per_tile].unbind(1)
        yield t, h, log_a[t, h, None] + log_l.index_select(0, t)


def _clamped_blocks(w: torch.Tensor, log_eps: float):
    """The clamped entropy's pruning, for one group's logits w (N, K): yields, per token block,
    (rows, log_a (block, 2^K1), kept, tiles). A (token, high) pair can hold a code with p >= eps only if
    log A[n, high] + max_low log L[n, low] >= log eps (float addition is monotone, so every code of any other pair
    has log p = log A + log L < log eps as computed here). Where at most half the pairs pass, kept (block, 2^K1) bool
    marks them and tiles (`_pair_tiles`) covers only them, sorted by token (torch.nonzero's order); otherwise kept is
    None and tiles (`_dense_tiles`) covers every code (gathering would cost more than it saves). Peaked distributions
    keep a few pairs per token; flat ones stream every code, as the exact avg does. Tiles and per-block tables hold
    at most a quarter of _TILE_ELEMENTS each (about four tile-sized temporaries are alive at once in the backward)."""
    n, k = w.shape
    k1, k2 = _split(k)
    budget = max(1, _TILE_ELEMENTS // 4)
    block = max(1, min(n, budget >> max(k1, k2)))
    for r0 in range(0, n, block):
        rows = slice(r0, r0 + block)
        log_a, log_l = factor(w[rows, :k1], log=True), factor(w[rows, k1:], log=True)
        kept = (log_a + log_l.amax(1, keepdim=True)) >= log_eps
        if 2 * int(kept.sum()) > kept.numel():
            yield rows, log_a, None, _dense_tiles(log_a, log_l, budget)
        else:
            yield rows, log_a, kept, _pair_tiles(log_a, log_l, kept.nonzero(), budget)


def _setup(x, dim, codebook_scale, spherical, num_codebooks):
    """What forward and backward both start from: (N, groups, K) tokens, x~ and its clamped norm (or None), sigma."""
    xg = tokens(x, dim, num_codebooks)
    sigma = code_value(xg.shape[-1], codebook_scale, spherical)
    xn, r = normalized(xg, codebook_scale, spherical)
    return xg, xn, r, sigma


def _codes(positive: torch.Tensor, sigma: float, dtype: torch.dtype) -> torch.Tensor:
    """The quantized values: exactly +-sigma in `dtype`."""
    return positive.to(dtype) * (2.0 * sigma) - sigma


def _average(w: torch.Tensor) -> torch.Tensor:
    """(groups, 2^K) mean over tokens of p(c | x): avg[high, low] = sum_n A[n, high] L[n, low] / N, one GEMM of
    per-bit factor tables per token block."""
    n, groups, k = w.shape
    k1, k2 = _split(k)
    avg = w.new_zeros(groups, 1 << k1, 1 << k2)
    block = _block(n, (1 << k1) + (1 << k2))
    for g in range(groups):
        wg = w[:, g]
        for r0 in range(0, n, block):
            rows = slice(r0, r0 + block)
            avg[g].addmm_(factor(wg[rows, :k1]).t(), factor(wg[rows, k1:]))
    return avg.div_(n).flatten(1)


def _clamped_entropy(w: torch.Tensor, eps: float) -> torch.Tensor:
    """0-d sum over tokens and groups of -sum_c p log max(p, eps): the tiles' codes as written, those of unkept
    pairs through their mass."""
    log_eps = math.log(eps)
    total = w.new_zeros(())
    for g in range(w.shape[1]):
        for _, log_a, kept, tiles in _clamped_blocks(w[:, g], log_eps):
            if kept is not None:  # an unkept (token, high) pair's codes all have p < eps and total mass A[n, high]
                total -= log_eps * log_a.exp().masked_fill_(kept, 0).sum()  # (sum_low L = 1); nothing cancels
            for _, _, logp in tiles:
                total -= logp.exp().mul_(logp.clamp_(min=log_eps)).sum()
    return total


def _gradient(w: torch.Tensor, weight: torch.Tensor | None, ps_weight: torch.Tensor | None,
              eps: float) -> torch.Tensor:
    """(N, groups, K) d/dw of sum_c G_c p_c per token: sum_c p_c G_c (bits(c) - sigmoid(w)), with
    G_c = weight[g, c] (or 0 for None) + ps_weight * (-max(log p, log eps) - [p >= eps]) (or 0 for None)."""
    n, groups, k = w.shape
    k1, k2 = _split(k)
    dw = torch.zeros_like(w)
    block = _block(n, (1 << k1) + (1 << k2))
    for g in range(groups):
        wg = w[:, g]
        if weight is not None:  # sum_c G_c A[n, high] L[n, low]: dA = L G^T, dL = A G with G as (2^K1, 2^K2)
            gm = weight[g].view(1 << k1, 1 << k2)
            for r0 in range(0, n, block):
                rows = slice(r0, r0 + block)
                wh, wl = wg[rows, :k1], wg[rows, k1:]
                a, l_ = factor(wh), factor(wl)
                dw[rows, g, :k1] += _bit_grad(l_ @ gm.t(), a, wh)
                dw[rows, g, k1:] += _bit_grad(a @ gm, l_, wl)
        if ps_weight is not None:
            # d(-p log max(p, eps)) / dp = -max(log p, log eps) - [p >= eps] =: G_c; d/dw = sum_c p_c G_c (bits(c) -
            # sigmoid(w)), taken as S1 sigmoid(-w) - S0 sigmoid(w) with S1, S0 = sum_c p_c G_c [bit = 1], [bit = 0]
            # per token (no large uncentered total minus sigmoid(w) * another). The tiles' codes as written; an unkept
            # pair's codes all have G = -log eps: G A[n, high] for the high bits and nothing for the low ones (their
            # S1, S0 are G A[n, high] (sigmoid(w_low), sigmoid(-w_low)), which cancel exactly).
            acc = w.dtype
            log_eps = math.log(eps)
            bh, bl = bits(0, 1 << k1, k1, acc, w.device), bits(0, 1 << k2, k2, acc, w.device)
            bh, bl = torch.cat([bh, 1 - bh], 1), torch.cat([bl, 1 - bl], 1)
            for rows, log_a, kept, tiles in _clamped_blocks(wg, log_eps):
                if kept is None:  # the dense tiles fill it
                    by_high = torch.empty_like(log_a)  # sum_low p G per (token, high)
                else:
                    by_high = log_a.exp().masked_fill_(kept, 0).mul_(-log_eps * ps_weight)
                by_low = log_a.new_zeros(log_a.shape[0], 1 << k2)  # sum_high p G per (token, low)
                for t, h, logp in tiles:
                    p = logp.exp()
                    gt = (logp >= log_eps).to(acc).add_(logp.clamp_(min=log_eps)).mul_(p).mul_(-ps_weight)
                    if t is None:
                        by_high[:, h] = gt.sum(2)
                        by_low += gt.sum(1)
                        continue
                    by_high[t, h] = gt.sum(1)  # each (token, high) pair appears once: plain assignment
                    # a token's pairs are consecutive (nonzero sorts by token): a segment sum. torch.segment_reduce
                    # is deterministic on CPU (sequential) and CUDA (one thread per segment and column, or cub's
                    # segmented reduce; no atomics), and tok is unique, so += is a plain gather / add / scatter
                    # (not index_add_, which uses float atomics on CUDA)
                    tok, counts = torch.unique_consecutive(t, return_counts=True)
                    by_low[tok] += torch.segment_reduce(gt, "sum", lengths=counts, axis=0, unsafe=True)
                hi, lo, wr = by_high @ bh, by_low @ bl, wg[rows]
                pos, neg = torch.sigmoid(wr), torch.sigmoid(-wr)
                dw[rows, g, :k1] += hi[:, :k1] * neg[:, :k1] - hi[:, k1:] * pos[:, :k1]
                dw[rows, g, k1:] += lo[:, :k2] * neg[:, k1:] - lo[:, k2:] * pos[:, k1:]
    return dw


class CodeStreams(NamedTuple):
    """A backend's passes over the 2^K codes of every group (the rest of LFQ is O(N K) PyTorch that all backends
    share through `forward` and `backward`). w: (N, groups, K) per-bit logits in the accumulation dtype.
    average(w) -> (groups, 2^K) mean over tokens of p(c | x); clamped_entropy(w, eps) -> 0-d sum over tokens
    and groups of -sum_c p log max(p, eps); gradient(w, weight, ps_weight, eps) -> (N, groups, K), `_gradient`'s."""
    average: Callable
    clamped_entropy: Callable
    gradient: Callable


STREAMS = CodeStreams(_average, _clamped_entropy, _gradient)


def forward(streams: CodeStreams, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps):
    """lfq_forward with the code passes of `streams`."""
    xg, xn, _, sigma = _setup(x, dim, codebook_scale, spherical, num_codebooks)
    n, groups, k = xg.shape
    positive = xn > 0
    q = _codes(positive, sigma, xg.dtype)
    indices = (positive.long() << torch.arange(k - 1, -1, -1, device=x.device)).sum(-1)
    commit = (xn - q).square().sum() / xn.numel()
    w = xn * (4.0 * inv_temperature * sigma)
    ps_sum = streams.clamped_entropy(w, eps) if clamped else _binary_entropy(w).sum()
    return (untokens(q, x, dim), indices.reshape(x.movedim(dim, -1).shape[:-1] + (groups,)), streams.average(w),
            ps_sum / (n * groups), commit)


def backward(streams: CodeStreams, dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical,
             num_codebooks, clamped, eps):
    """lfq_backward with the code passes of `streams`."""
    xg, xn, r, sigma = _setup(x, dim, codebook_scale, spherical, num_codebooks)
    n, groups, k = xg.shape
    acc = xg.dtype
    dxn = torch.zeros_like(xn) if dq is None else tokens(dq, dim, num_codebooks).clone()
    if d_commit is not None:
        q = _codes(xn > 0, sigma, acc)
        dxn += (xn - q) * (2.0 * d_commit.to(acc) / xn.numel())
    scale_w = 4.0 * inv_temperature * sigma
    w = xn * scale_w
    ps_weight = None if d_ps is None else d_ps.to(acc) / (n * groups)
    weight = None if d_avg is None else d_avg.to(acc) / n
    if weight is not None or (ps_weight is not None and clamped):
        dw = streams.gradient(w, weight, ps_weight if clamped else None, eps)
    else:
        dw = torch.zeros_like(w)
    if ps_weight is not None and not clamped:  # d h(sigmoid(w)) / dw = -w sigmoid(w) sigmoid(-w)
        dw -= w * torch.sigmoid(w) * torch.sigmoid(-w) * ps_weight
    dxn += dw * scale_w
    if spherical:  # x~ = s x / r: dx = s / r (dx~ - u <u, dx~>), u = x / r (no projection where r was clamped)
        u = xg / r
        radial = (u * dxn).sum(-1, keepdim=True) * (xg.norm(dim=-1, keepdim=True) > _NORM_EPS)
        dxn = (dxn - u * radial) * (codebook_scale / r)
    return untokens(dxn, x, dim)


def lfq_forward(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps):
    return forward(STREAMS, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps)


def lfq_backward(dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks,
                 clamped, eps):
    return backward(STREAMS, dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical,
                    num_codebooks, clamped, eps)
