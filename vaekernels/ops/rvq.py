"""factorized_residual_quantize: residual VQ with factorised codes (DAC's and SNAC's ResidualVectorQuantize), every
level in one autograd node.

Level i of Q, on the running residual r_i of z [B, D, T] (r_0 = z):
  e_i  = W_in_i · avgpool_{s_i}(r_i) + b_in_i          the latents, k_i dims at T / s_i steps
  q_i  = codebook_i[nearest code to e_i]                 by cosine or l2, through the fused search
  zq_i = repeat_{s_i}(W_out_i · q_i + b_out_i)           straight-through: the gradient of q_i goes to e_i
  r_{i+1} = r_i - zq_i,   quantized = sum_i m_i · zq_i   m_i[b] = (i < depth[b]), quantizer dropout's mask
and per level and sample the mean squared error of e_i against q_i, twice: as the commitment loss (gradient to
e_i) and as the codebook loss (gradient to the codebook).

Why one node: the per-level loop makes autograd keep every level's D-wide residual (each projection saves its
input). Here the forward keeps one D-wide residual buffer, updated in place, and saves only z and each level's
k-dimensional tensors. The backward is linear in the straight-through path, so it runs in the code dimensions:
the levels couple through k_j x k_i matrices W_in_j · W_out_i, and the D-wide tensors are touched by four matmuls
over all levels at once (the gradients of z, W_in and W_out, and the out-projection's input gradient), not by
a pass per level.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _checks
from ..reference.vq import gather_codes
from .vq import nearest_code


class ResidualVQResult(NamedTuple):
    """quantized: z's shape, the sum of the first depth[b] levels' outputs; indices: one int64 [B, T / s_i] per
    level (-1 where the latent has NaN); latents: e_i, one [B, k_i, T / s_i] per level; commitment_loss and
    codebook_loss: [Q, B], the mean over code dims and time of (e_i - q_i)^2, with gradients to the latents and to
    the codebooks respectively."""
    quantized: Tensor
    indices: tuple[Tensor, ...]
    latents: tuple[Tensor, ...]
    commitment_loss: Tensor
    codebook_loss: Tensor


def _sum_pool(x: Tensor, s: int) -> Tensor:
    """[B, k, T] -> [B, k, T / s]: sums of s consecutive steps (the adjoint of repeating each step s times)."""
    return x if s == 1 else x.unflatten(-1, (-1, s)).sum(-1)


def _repeat(x: Tensor, s: int) -> Tensor:
    return x if s == 1 else x.repeat_interleave(s, dim=-1)


def _forward(z, w_in, b_in, w_out, b_out, codebooks, strides, mask, full, distance):
    """The levels in order on one residual buffer. Returns quantized, the latents, indices, the straight-through
    inputs of the out-projections (a_i = e_i + (q_i - e_i), the value the originals project) and e_i - q_i."""
    residual = z.clone()
    latents, indices, projected, errors = [], [], [], []
    for w, c, v, d, cb, s in zip(w_in, b_in, w_out, b_out, codebooks, strides):
        e = torch.bmm(w.expand(z.shape[0], -1, -1), residual)  # before pooling: the same value, s times less work
        e = F.avg_pool1d(e, s, s) if s > 1 else e
        e = e.add_(c.unsqueeze(-1))
        idx = nearest_code(e, cb, distance=distance, dim=1)
        # the codes, NaN where the latent had NaN (index -1), never a real code
        q = gather_codes(cb, idx.reshape(-1), cb.dtype, no_nan=False).view(*idx.shape, -1).transpose(1, 2)
        err = e - q
        a = e - err  # the originals' e + (q - e), bit for bit (negation is exact)
        # residual -= W_out a + b_out: the bias rides in the matmul as a column against a row of ones
        wa = torch.cat([v, d.unsqueeze(-1)], 1).expand(z.shape[0], -1, -1)
        aa = torch.cat([a, a.new_ones(a.shape[0], 1, a.shape[2])], 1)
        if s == 1:
            residual.baddbmm_(wa, aa, alpha=-1)
        else:
            residual.unflatten(-1, (-1, s)).sub_(torch.bmm(wa, aa).unsqueeze(-1))
        latents.append(e)
        indices.append(idx)
        projected.append(a)
        errors.append(err)
    # quantized = sum_i m_i (W_out_i repeat(a_i) + b_out_i): one matmul over all levels, biases as mask columns
    cols = [_repeat(a, s) if full else _repeat(a * m[:, None, None], s)
            for a, m, s in zip(projected, mask, strides)]
    cols.append(mask.t().unsqueeze(-1).expand(-1, -1, z.shape[2]))
    weights = torch.cat([*w_out, torch.stack(list(b_out), 1)], 1)
    quantized = torch.matmul(weights, torch.cat(cols, 1))
    return quantized, latents, indices, projected, errors


class _FactorizedRVQ(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, mask, full, strides, distance, *params):
        q = len(strides)
        w_in, b_in, w_out, b_out, codebooks = (params[i * q:(i + 1) * q] for i in range(5))
        quantized, latents, indices, projected, errors = _forward(z, w_in, b_in, w_out, b_out, codebooks, strides,
                                                                  mask, full, distance)
        sq = torch.stack([err.square().mean((1, 2)) for err in errors])
        ctx.strides, ctx.sizes, ctx.full = strides, [cb.shape[0] for cb in codebooks], full
        ctx.device_type = z.device.type
        ctx.save_for_backward(z, mask, *w_in, *w_out, *b_out, *projected, *errors, *indices)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*indices)
        return (quantized, sq, sq.clone(), *latents, *indices)

    @staticmethod
    def backward(ctx, *grads):
        with torch.autocast(ctx.device_type, enabled=False):  # as the forward: in z's dtype
            return _FactorizedRVQ._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, g_quantized, g_commit, g_codebook, *g_rest):
        s = ctx.strides
        n = len(s)
        z, mask, *saved = ctx.saved_tensors
        w_in, w_out, b_out, projected, errors, indices = (saved[i * n:(i + 1) * n] for i in range(6))
        g_latents = g_rest[:n]
        dims = [w.shape[0] for w in w_in]
        starts = [sum(dims[:i]) for i in range(n + 1)]
        w_in_all, w_out_all = torch.cat(w_in, 0), torch.cat(w_out, 1)  # [sum k, D], [D, sum k]
        # the gradient reaching each level's projected code from quantized, all levels in one matmul
        h_all = None if g_quantized is None else torch.matmul(w_out_all.t(), g_quantized)
        coupling = torch.matmul(w_out_all.t(), w_in_all.t())  # block (i, j): W_out_i^T W_in_j^T, k_i x k_j
        # level j's block of u_all: u_j = repeat(g_e_j) / s_j, its latent gradient on z's time axis, which W_in_j^T
        # maps into the residual r_j
        u_all = z.new_empty(z.shape[0], starts[-1], z.shape[2])
        per_sample = mask[:, :, None, None]
        for i in reversed(range(n)):
            ri, rest = slice(starts[i], starts[i + 1]), slice(starts[i + 1], None)
            g = torch.zeros_like(errors[i]) if h_all is None else _sum_pool(h_all[:, ri], s[i])
            g = g if ctx.full else g * per_sample[i]
            if i + 1 < n:  # minus W_out_i^T g_r_{i+1}, where g_r_{i+1} = sum_{j>i} W_in_j^T u_j: in k dims
                g = g - _sum_pool(torch.matmul(coupling[ri, rest], u_all[:, rest]), s[i])
            if g_latents[i] is not None:
                g = g + g_latents[i]
            if g_commit is not None:
                g = g + errors[i] * (g_commit[i] * (2 / errors[i][0].numel()))[:, None, None]
            u_all[:, ri] = _repeat(g, s[i]) / s[i] if s[i] > 1 else g
        v_all = torch.cat([_repeat(a, si) for a, si in zip(projected, s)], 1)  # repeat(a_i): what W_out_i saw
        cross = torch.matmul(u_all, v_all.transpose(1, 2)).sum(0)  # [sum k, sum k]: sum over b, t of u_i v_j^T
        u_sum = u_all.sum((0, 2))
        # r_i = z - sum_{j<i} (W_out_j v_j + b_out_j), so sum_t u_i r_i^T = u_i z^T minus k-dim corrections
        dw_in_all = torch.matmul(u_all, z.transpose(1, 2)).sum(0)
        dz = torch.matmul(w_in_all.t(), u_all)
        # the k-dim corrections of every level at once: entry (r, c) of `cross` couples a later level's row r to an
        # earlier level's column c; for W_in_i the earlier levels' residual terms, for W_out_i and b_out_i the
        # later levels' part of g_r_{i+1} = sum_{j>i} W_in_j^T u_j
        pair_later, row_after = _level_masks(tuple(dims), z.device)
        cross_later = cross * pair_later
        b_out_all = torch.stack(b_out)
        b_before = row_after.to(b_out_all.dtype) @ b_out_all  # sum_{j<i} b_out_j for each row of level i
        grad_w_in = dw_in_all - cross_later @ w_out_all.t() - u_sum[:, None] * b_before
        grad_w_out = -(w_in_all.t() @ cross_later)
        grad_b_out = -(w_in_all.t() @ (u_sum[:, None] * row_after)).t()
        if g_quantized is not None:
            mv = v_all if ctx.full else torch.cat([_repeat(a * m, si)
                                                   for a, m, si in zip(projected, per_sample, s)], 1)
            grad_w_out = grad_w_out + torch.matmul(g_quantized, mv.transpose(1, 2)).sum(0)
            grad_b_out = grad_b_out + mask @ g_quantized.sum(2)  # [Q, D]
        grads_cb = []
        for i in range(n):
            dcb = None  # the codebooks learn only from codebook_loss (SNAC has none: no gradient, as there)
            if g_codebook is not None:  # d/dq of mean (q - sg(e))^2, scattered to the codes (NaN rows add 0)
                scale = g_codebook[i] * (-2 / errors[i][0].numel())
                rows = (errors[i] * scale[:, None, None]).transpose(1, 2).reshape(-1, dims[i])
                idx = indices[i].reshape(-1)
                rows = rows.masked_fill((idx < 0).unsqueeze(1), 0)
                dcb = rows.new_zeros(ctx.sizes[i], dims[i]).index_add_(0, idx.clamp_min(0), rows)
            grads_cb.append(dcb)
        grads_w_in, grads_b_in = grad_w_in.split(dims, 0), u_sum.split(dims)
        grads_w_out, grads_b_out = grad_w_out.split(dims, 1), grad_b_out.unbind(0)
        return (dz, None, None, None, None, *grads_w_in, *grads_b_in, *grads_w_out, *grads_b_out, *grads_cb)


def _level_masks(dims: tuple[int, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    """For rows and columns laid out level after level (dims[i] each): pair_later [sum k, sum k], whether row r's
    level comes after column c's, and row_after [sum k, Q], whether row r's level comes after level i."""
    level = torch.tensor([i for i, k in enumerate(dims) for _ in range(k)], device=device)
    return level[:, None] > level[None, :], level[:, None] > torch.arange(len(dims), device=device)[None, :]


def factorized_residual_quantize(z: Tensor, codebooks: Sequence[Tensor], in_weights: Sequence[Tensor],
                                 out_weights: Sequence[Tensor], in_biases: Optional[Sequence[Optional[Tensor]]] = None,
                                 out_biases: Optional[Sequence[Optional[Tensor]]] = None, *,
                                 strides: Optional[Sequence[int]] = None, depth: Optional[Tensor] = None,
                                 distance: str = "cosine") -> ResidualVQResult:
    """Residual VQ of z [B, D, T] through len(codebooks) levels with factorised codes, in one autograd node.

    codebooks[i]: [K_i, k_i]; in_weights[i]: [k_i, D] and out_weights[i]: [D, k_i] (or 1x1 Conv1d weights, with
    any weight norm already applied); biases: [k_i] and [D], None for none. strides[i] (default 1): level i looks up
    avgpool(residual, s_i) and repeats its output s_i times (SNAC); each must divide T. depth: [B] numbers of levels
    summed into quantized per sample (quantizer dropout; default all); every level is still searched. distance:
    "cosine" (DAC, SNAC: l2-normalised latents and codes, the unnormalised code returned) or "l2".
    Gradients: straight-through to z and the projections; the codebooks learn from codebook_loss only. Under
    autocast the op computes in z's dtype (the weights cast to it), not in autocast's lower precision.
    """
    z = _checks.float_tensor("z", z)
    if z.dim() != 3:
        raise ValueError(f"z must be [B, D, T] (channels at dim 1, time last), got shape {list(z.shape)}")
    b, d, t = z.shape
    n = len(codebooks)
    if n == 0:
        raise ValueError("codebooks must name at least one level")
    in_biases = [None] * n if in_biases is None else list(in_biases)
    out_biases = [None] * n if out_biases is None else list(out_biases)
    strides = (1,) * n if strides is None else tuple(_checks.integer("strides", s, minimum=1) for s in strides)
    for name, seq in (("in_weights", in_weights), ("out_weights", out_weights), ("in_biases", in_biases),
                      ("out_biases", out_biases), ("strides", strides)):
        if len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} codebooks")
    _checks.choice("distance", distance, _checks.DISTANCES)
    if any(t % s for s in strides):
        raise ValueError(f"strides must divide z's time length {t}, got {list(strides)}")
    cbs, w_in, w_out, b_in, b_out = [], [], [], [], []
    for i in range(n):
        cb = _checks.matrix(f"codebooks[{i}]", codebooks[i], None, None, z)
        k = cb.shape[1]
        cbs.append(cb)
        w_in.append(_checks.matrix(f"in_weights[{i}]", in_weights[i], k, d, z))
        w_out.append(_checks.matrix(f"out_weights[{i}]", out_weights[i], d, k, z))
        for name, bias, size, out in (("in_biases", in_biases[i], k, b_in), ("out_biases", out_biases[i], d, b_out)):
            if bias is None:
                bias = z.new_zeros(size)
            elif tuple(bias.shape) != (size,):
                raise ValueError(f"{name}[{i}] must be [{size}], got {list(bias.shape)}")
            out.append(bias)
    if depth is None:
        mask = z.new_ones(n, b)
    else:
        if not isinstance(depth, Tensor) or depth.shape != (b,):
            raise ValueError(f"depth must be a tensor of {b} per-sample level counts, got "
                             f"{list(depth.shape) if isinstance(depth, Tensor) else type(depth).__name__}")
        mask = (torch.arange(n, device=z.device)[:, None] < depth.to(z.device)[None, :]).to(z.dtype)
    dtype = z.dtype
    params = [p if p.dtype == dtype else p.to(dtype) for p in (*w_in, *b_in, *w_out, *b_out, *cbs)]
    with torch.autocast(z.device.type, enabled=False):  # in z's dtype throughout, autocast or not
        out = _FactorizedRVQ.apply(z, mask, depth is None, strides, distance, *params)
    return ResidualVQResult(out[0], tuple(out[3 + n:]), tuple(out[3:3 + n]), out[1], out[2])
