"""lookup_free_quantize: lookup-free (LFQ) and binary spherical (BSQ) quantization with the exact entropy terms.

Two torch.library ops: `lfq_fwd` gives the quantized codes, indices, the batch-averaged code distribution avg
(num_codebooks, 2^K), the per-sample entropy and the commitment loss, streaming over code tiles; `lfq_bwd` gives
the input gradient from the gradients of quantized (straight-through), avg, the per-sample entropy and the
commitment loss, in one more streamed pass. The codebook entropy is an O(2^K) function of avg computed here in
PyTorch, so autograd hands `lfq_bwd` g = d loss / d avg, and under torch.distributed avg is averaged over ranks
(torch.distributed.nn.all_reduce, as vector-quantize-pytorch does) before it. Nothing tokens x codes is stored.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .. import _backend, _checks
from ..reference.gaussian import acc_dtype
from ._library import Op, needs_grad

MAX_BITS = 24
ENTROPIES = ("exact", "clamped")


class LFQResult(NamedTuple):
    """quantized: x's shape and dtype (straight-through gradient); indices: int64, x's shape with `dim` replaced by a
    last axis of size num_codebooks; the losses: 0-d, float32 (float64 for float64 x)."""
    quantized: Tensor
    indices: Tensor
    entropy_loss: Tensor
    per_sample_entropy: Tensor
    codebook_entropy: Tensor
    commitment_loss: Tensor


def _size(x: Tensor, dim: int, num_codebooks: int) -> tuple[int, int]:
    c = x.shape[dim]
    return x.numel() // c, c // num_codebooks


def _lfq_fwd(x: Tensor, dim: int, inv_temperature: float, codebook_scale: float, spherical: bool,
             num_codebooks: int, clamped: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.implementation("lfq_fwd", x.device, _size(x, dim, num_codebooks))
    return impl.lfq_forward(x.contiguous(), dim, inv_temperature, codebook_scale, spherical, num_codebooks,
                            clamped, eps)


def _lfq_fwd_fake(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps):
    acc = acc_dtype(x.dtype)
    k = x.shape[dim] // num_codebooks
    idx_shape = x.movedim(dim, -1).shape[:-1] + (num_codebooks,)
    return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(idx_shape, dtype=torch.int64),
            x.new_empty((num_codebooks, 1 << k), dtype=acc), x.new_empty((), dtype=acc),
            x.new_empty((), dtype=acc))


def _lfq_bwd(dq: Optional[Tensor], d_avg: Optional[Tensor], d_ps: Optional[Tensor], d_commit: Optional[Tensor],
             x: Tensor, dim: int, inv_temperature: float, codebook_scale: float, spherical: bool,
             num_codebooks: int, clamped: bool, eps: float) -> Tensor:
    impl = _backend.implementation("lfq_bwd", x.device, _size(x, dim, num_codebooks))
    return impl.lfq_backward(None if dq is None else dq.contiguous(), None if d_avg is None else d_avg.contiguous(),
                             d_ps, d_commit, x.contiguous(), dim, inv_temperature, codebook_scale, spherical,
                             num_codebooks, clamped, eps)


def _lfq_bwd_fake(dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks,
                  clamped, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


lfq_fwd = Op("lfq_fwd", _lfq_fwd, _lfq_fwd_fake)
lfq_bwd = Op("lfq_bwd", _lfq_bwd, _lfq_bwd_fake)


class _LFQ(torch.autograd.Function):
    """Autograd for lfq_fwd: saves only x (the backward recomputes everything per token and streams the codes)."""

    @staticmethod
    def forward(ctx, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps):
        q, indices, avg, ps, commit = lfq_fwd(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks,
                                             clamped, eps)
        ctx.save_for_backward(x)
        ctx.args = (dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps)
        ctx.mark_non_differentiable(indices)
        ctx.set_materialize_grads(False)
        return q, indices, avg, ps, commit

    @staticmethod
    def backward(ctx, dq, _didx, d_avg, d_ps, d_commit):
        (x,) = ctx.saved_tensors
        if dq is None and d_avg is None and d_ps is None and d_commit is None:
            return (None,) * 8
        dx = lfq_bwd(dq, d_avg, d_ps, d_commit, x, *ctx.args)
        return (dx,) + (None,) * 7


def _distributed_mean(avg: Tensor) -> Tensor:
    """avg averaged over ranks under torch.distributed with several processes (gradient through all_reduce)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed import nn as dist_nn

        return dist_nn.all_reduce(avg) / dist.get_world_size()
    return avg


def codebook_entropy(avg: Tensor, clamped: bool, eps: float) -> Tensor:
    """Mean over groups of H(avg): -sum avg log avg (zeros contribute nothing, with zero gradient), or
    -sum avg log max(avg, eps)."""
    if clamped:
        logs = avg.clamp(min=eps).log()
    else:
        logs = torch.where(avg > 0, avg, torch.ones_like(avg)).log()
    return -(avg * logs).sum(-1).mean()


def _check(x, dim, inv_temperature, diversity_gamma, codebook_scale, spherical, num_codebooks, entropy, eps):
    _checks.latent(x, "x")
    _checks.non_empty("x", x)
    dim = _checks.channel_dim(dim, x.dim())
    inv_temperature = _checks.number("inv_temperature", inv_temperature, positive=True)
    diversity_gamma = _checks.number("diversity_gamma", diversity_gamma)
    codebook_scale = _checks.number("codebook_scale", codebook_scale, positive=True)
    if not isinstance(spherical, bool):
        raise TypeError(f"spherical must be a bool, got {type(spherical).__name__}")
    num_codebooks = _checks.integer("num_codebooks", num_codebooks, minimum=1)
    _checks.choice("entropy", entropy, ENTROPIES)
    eps = _checks.number("eps", eps, positive=True)
    c = x.shape[dim]
    if c % num_codebooks:
        raise ValueError(f"x has {c} channels along dim={dim}, not a multiple of num_codebooks={num_codebooks}")
    k = c // num_codebooks
    if k > MAX_BITS:
        raise ValueError(f"K = {k} bits per codebook ({c} channels / num_codebooks={num_codebooks}) is more than "
                         f"{MAX_BITS}: the 2^K-vector of averaged probabilities would not fit")
    return dim, inv_temperature, diversity_gamma, codebook_scale, num_codebooks, eps


def lookup_free_quantize(x: Tensor, *, dim: int = -1, inv_temperature: float = 100.0, diversity_gamma: float = 1.0,
                         codebook_scale: float = 1.0, spherical: bool = False, num_codebooks: int = 1,
                         entropy: str = "exact", eps: float = 1e-5) -> LFQResult:
    """Lookup-free quantization (MAGVIT-v2's LFQ; with spherical=True, BSQ) with the exact entropy regulariser.

    x has num_codebooks * K channels along `dim` (K <= 24); each group of K is quantized to where(x > 0, s, -s)
    (s = codebook_scale; spherical: x is l2-normalised and scaled by s per group first, the codes are +-s/sqrt(K)),
    with a straight-through gradient. indices pack the bits most significant first. With p(c | x) the softmax over
    the 2^K codes of 2 * inv_temperature * <x, c>: per_sample_entropy is the mean over tokens and groups of H(p),
    codebook_entropy the mean over groups of H(mean over tokens of p) (under torch.distributed, of the mean over
    ranks too), entropy_loss = per_sample_entropy - diversity_gamma * codebook_entropy, commitment_loss
    mean((x - sg(q))^2). entropy="exact": H = -sum p log p; "clamped": -sum p log max(p, eps), as
    vector-quantize-pytorch's LFQ. Memory O(N * K + 2^K): the tokens x codes matrix never exists.
    """
    dim, inv_temperature, diversity_gamma, codebook_scale, num_codebooks, eps = _check(
        x, dim, inv_temperature, diversity_gamma, codebook_scale, spherical, num_codebooks, entropy, eps)
    clamped = entropy == "clamped"
    args = (dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps)
    if needs_grad(x):
        q, indices, avg, ps, commit = _LFQ.apply(x, *args)
    else:
        q, indices, avg, ps, commit = lfq_fwd(x, *args)
    cb = codebook_entropy(_distributed_mean(avg), clamped, eps)
    return LFQResult(q, indices, ps - diversity_gamma * cb, ps, cb, commit)
