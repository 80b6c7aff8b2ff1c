"""index_backprop_quantize: IBQ (Shi et al. 2024, SEED-Voken's IndexPropagationQuantize) with MAGVIT-v2's entropy
loss, without any tokens x codes tensor.

Two torch.library ops: `ibq_fwd` gives the quantized codes, the maximum-inner-product indices, the batch average
a of p = softmax(z C^T / T), the per-sample entropy, the quantization loss and the per-row statistics the backward
needs (max L, both log-normalisers, H(p) and P C: O(N D)); `ibq_bwd` gives the gradients of z and the codebook
from those of quantized, a, the per-sample entropy and the quantization loss. The codebook entropy is an O(K)
function of a computed here in PyTorch, so under torch.distributed a can be averaged over ranks with gradient.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .. import _backend, _checks
from ..reference.gaussian import acc_dtype
from ..reference.vq import index_shape
from ._library import Op, distinct, needs_grad
from .lfq import _distributed_mean


class IBQResult(NamedTuple):
    """quantized: z's shape and dtype, value codebook[indices], IBQ's gradient; indices: int64, z's shape without
    `dim` (-1 for NaN rows); the losses: 0-d in the accumulation dtype (float32, or float64); the three entropy
    fields are None with entropy=False."""
    quantized: Tensor
    indices: Tensor
    quant_loss: Tensor
    per_sample_entropy: Optional[Tensor]
    codebook_entropy: Optional[Tensor]
    entropy_loss: Optional[Tensor]


def _size(z: Tensor, codebook: Tensor, dim: int) -> tuple[int, int, int]:
    return z.numel() // z.shape[dim], codebook.shape[0], z.shape[dim]


def _ibq_fwd(z: Tensor, codebook: Tensor, dim: int, beta: float, temperature: float,
             entropy: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.implementation("ibq_fwd", z.device, _size(z, codebook, dim))
    return impl.ibq_forward(z, codebook, dim, beta, temperature, entropy)


def _ibq_fwd_fake(z, codebook, dim, beta, temperature, entropy):
    acc = acc_dtype(torch.promote_types(z.dtype, codebook.dtype))
    n, k, d = _size(z, codebook, dim)
    return (torch.empty_like(z, memory_format=torch.contiguous_format),
            z.new_empty(index_shape(z, dim), dtype=torch.int64), z.new_empty(k if entropy else 0, dtype=acc),
            z.new_empty(() if entropy else 0, dtype=acc), z.new_empty((), dtype=acc), z.new_empty(n, 4, dtype=acc),
            z.new_empty(n, d, dtype=acc))


def _ibq_bwd(dq: Optional[Tensor], d_avg: Optional[Tensor], d_ps: Optional[Tensor], d_quant: Optional[Tensor],
             z: Tensor, codebook: Tensor, indices: Tensor, stats: Tensor, pc: Tensor, dim: int, beta: float,
             temperature: float) -> tuple[Tensor, Tensor]:
    impl = _backend.implementation("ibq_bwd", z.device, _size(z, codebook, dim))
    return impl.ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature)


def _ibq_bwd_fake(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature):
    return torch.empty_like(z, memory_format=torch.contiguous_format), torch.empty_like(codebook)


ibq_fwd = Op("ibq_fwd", _ibq_fwd, _ibq_fwd_fake)
ibq_bwd = Op("ibq_bwd", _ibq_bwd, _ibq_bwd_fake)


class _IBQ(torch.autograd.Function):
    """Autograd for ibq_fwd: saves z, the codebook, the indices and O(N) statistics with P C (N, D)."""

    @staticmethod
    def forward(ctx, z, codebook, dim, beta, temperature, entropy):
        q, ind, avg, ps, quant, stats, pc = ibq_fwd(z, codebook, dim, beta, temperature, entropy)
        ctx.save_for_backward(z, codebook, ind, stats, pc)
        ctx.args = (dim, beta, temperature)
        ctx.mark_non_differentiable(ind, stats, pc)
        ctx.set_materialize_grads(False)
        return q, ind, avg, ps, quant, stats, pc

    @staticmethod
    def backward(ctx, dq, _dind, d_avg, d_ps, d_quant, _dstats, _dpc):
        z, codebook, ind, stats, pc = ctx.saved_tensors
        if dq is None and d_avg is None and d_ps is None and d_quant is None:
            return (None,) * 6
        dz, dcb = ibq_bwd(dq, d_avg, d_ps, d_quant, z, codebook, ind, stats, pc, *ctx.args)
        return dz, dcb, None, None, None, None


def codebook_entropy(avg: Tensor, eps: float) -> Tensor:
    """-sum_k a_k log(a_k + eps): MAGVIT-v2's batch entropy."""
    return -(avg * (avg + eps).log()).sum()


def _check(z, codebook, dim, beta, entropy_temperature, sample_entropy_weight, codebook_entropy_weight, eps,
           entropy, distributed):
    _checks.latent(z, "z")
    _checks.non_empty("z", z)
    dim = _checks.channel_dim(dim, z.dim())
    _checks.codebook(codebook, z, dim)
    beta = _checks.non_negative("beta", beta)
    temperature = _checks.number("entropy_temperature", entropy_temperature, positive=True)
    w_s = _checks.number("sample_entropy_weight", sample_entropy_weight)
    w_b = _checks.number("codebook_entropy_weight", codebook_entropy_weight)
    eps = _checks.number("eps", eps, positive=True)
    _checks.boolean("entropy", entropy)
    _checks.boolean("distributed", distributed)
    return dim, beta, temperature, w_s, w_b, eps


def index_backprop_quantize(z: Tensor, codebook: Tensor, *, dim: int = -1, beta: float = 0.25,
                            entropy_temperature: float = 0.01, sample_entropy_weight: float = 1.0,
                            codebook_entropy_weight: float = 1.0, eps: float = 1e-5, entropy: bool = True,
                            distributed: bool = False) -> IBQResult:
    """Index backpropagation quantization (IBQ): the code of maximum inner product, with a gradient that reaches z
    and every code through the softmax of the logits L = z codebook^T.

    quantized = (one_hot(ind) - sg(P) + P) codebook with P = softmax(L): its value is codebook[ind], ind = argmax L
    (lowest index on ties, -1 for rows with NaN). quant_loss = mean((z_q - z)^2) + mean((sg(z_q) - z)^2)
    + beta * mean((z_q - sg(z))^2) with z_q = codebook[ind] in the last two. With entropy=True, at temperature
    T = entropy_temperature, p = softmax(L / T): per_sample_entropy = mean over rows of H(p), codebook_entropy =
    -sum_k a_k log(a_k + eps) with a the mean over rows of p (distributed=True: and over ranks, with gradient), and
    entropy_loss = sample_entropy_weight * per_sample_entropy - codebook_entropy_weight * codebook_entropy.
    Logits and sums in float32 for 16-bit inputs. Memory O(N D + K D): the rows x codes matrix never exists.
    """
    dim, beta, temperature, w_s, w_b, eps = _check(z, codebook, dim, beta, entropy_temperature,
                                                    sample_entropy_weight, codebook_entropy_weight, eps, entropy,
                                                    distributed)
    if needs_grad(z, codebook):
        z, codebook = distinct(z, codebook)
        q, ind, avg, ps, quant, _, _ = _IBQ.apply(z, codebook, dim, beta, temperature, entropy)
    else:
        q, ind, avg, ps, quant, _, _ = ibq_fwd(z, codebook, dim, beta, temperature, entropy)
    if not entropy:
        return IBQResult(q, ind, quant, None, None, None)
    cb = codebook_entropy(_distributed_mean(avg) if distributed else avg, eps)
    return IBQResult(q, ind, quant, ps, cb, w_s * ps - w_b * cb)
