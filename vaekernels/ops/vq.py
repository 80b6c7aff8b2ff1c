"""nearest_code and vector_quantize: torch.library ops for the fused search, the VQ epilogue and its backward.

The search never materialises the N x K distances. "cosine" is the "l2" search on l2-normalised vectors
(normalising the codebook suffices for the argmin), so backends only implement "l2".
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _backend, _checks
from ..reference.gaussian import acc_dtype
from ..reference.vq import index_shape
from ._library import Op, distinct, needs_grad


class VQResult(NamedTuple):
    """What vector_quantize returns: quantized has z's shape (gradient by the chosen estimator), indices drop `dim`."""

    quantized: Tensor
    indices: Tensor
    loss: Tensor
    codebook_loss: Tensor
    commitment_loss: Tensor
    perplexity: Tensor


def _search_size(z: Tensor, codebook: Tensor, dim: int) -> tuple[int, int, int]:
    """(N rows, K codes, D): the problem size the backend choice of "auto" is keyed on."""
    return z.numel() // z.shape[dim], codebook.shape[0], z.shape[dim]


def _loss_dtype(z: Tensor, codebook: Tensor) -> torch.dtype:
    return torch.promote_types(z.dtype, codebook.dtype)


def _nearest_code(z: Tensor, codebook: Tensor, dim: int, precision: str) -> Tensor:
    if z.numel() == 0:
        return z.new_empty(index_shape(z, dim), dtype=torch.int64)
    impl = _backend.implementation("nearest_code", z.device, _search_size(z, codebook, dim))
    return impl.nearest_code(z, codebook, dim, precision)


def _nearest_code_fake(z, codebook, dim, precision):
    return z.new_empty(index_shape(z, dim), dtype=torch.int64)


def _vq_fwd(
    z: Tensor, codebook: Tensor, dim: int, precision: str, with_sums: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    loss_dtype = _loss_dtype(z, codebook)
    if z.numel() == 0:
        nan = torch.full((), float("nan"), dtype=loss_dtype, device=z.device)
        sums = z.new_zeros(codebook.shape if with_sums else (0,), dtype=acc_dtype(loss_dtype))
        return (torch.empty_like(z), z.new_empty(index_shape(z, dim), dtype=torch.int64), nan,
                z.new_zeros(codebook.shape[0], dtype=torch.int64), sums)
    impl = _backend.implementation("vq_fwd", z.device, _search_size(z, codebook, dim))
    quantized, indices, sq_err, counts, sums = impl.vq_forward(z, codebook, dim, precision, with_sums)
    loss = sq_err.div_(z.numel())
    loss = loss if loss.dtype == loss_dtype else loss.to(loss_dtype)
    return quantized, indices, loss, counts, (z.new_empty(0, dtype=sq_err.dtype) if sums is None else sums)


def _vq_fwd_fake(z, codebook, dim, precision, with_sums):
    acc = acc_dtype(_loss_dtype(z, codebook))
    return (
        torch.empty_like(z, memory_format=torch.contiguous_format),
        z.new_empty(index_shape(z, dim), dtype=torch.int64),
        z.new_empty((), dtype=_loss_dtype(z, codebook)),
        z.new_empty(codebook.shape[0], dtype=torch.int64),
        z.new_empty(codebook.shape if with_sums else (0,), dtype=acc),
    )


def _vq_bwd(
    dq: Optional[Tensor],
    z: Tensor,
    codebook: Tensor,
    indices: Tensor,
    d_commit: Optional[Tensor],
    d_codebook: Optional[Tensor],
    dim: int,
    estimator: str,
) -> tuple[Tensor, Tensor]:
    if z.numel() == 0:
        return torch.zeros_like(z), torch.zeros_like(codebook)
    impl = _backend.implementation("vq_bwd", z.device, _search_size(z, codebook, dim))
    dz, dcb = impl.vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator)
    return dz, (codebook.new_empty(0) if dcb is None else dcb)


def _vq_bwd_fake(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator):
    dcb = torch.empty_like(codebook) if d_codebook is not None else codebook.new_empty(0)
    return torch.empty_like(z, memory_format=torch.contiguous_format), dcb


nearest_code_op = Op("nearest_code", _nearest_code, _nearest_code_fake)
vq_fwd = Op("vq_fwd", _vq_fwd, _vq_fwd_fake)
vq_bwd = Op("vq_bwd", _vq_bwd, _vq_bwd_fake)


class _VQ(torch.autograd.Function):
    """Autograd for vq_fwd: returns the total loss (1 + beta) * mse and, separately, the codebook and the commitment
    loss (equal in value, different gradients); saves z, the codebook and the indices."""

    @staticmethod
    def forward(ctx, z, codebook, dim, precision, estimator, with_sums, beta):
        quantized, indices, loss, counts, sums = vq_fwd(z, codebook, dim, precision, with_sums)
        ctx.save_for_backward(z, codebook, indices)
        ctx.dim, ctx.estimator, ctx.beta = dim, estimator, beta
        ctx.mark_non_differentiable(indices, counts, sums)
        ctx.set_materialize_grads(False)
        return quantized, indices, loss * (1.0 + beta), loss, loss.clone(), counts, sums

    @staticmethod
    def backward(ctx, dq, _indices, d_loss, d_codebook_loss, d_commitment_loss, _counts, _sums):
        z, codebook, indices = ctx.saved_tensors
        d_codebook = _add(d_codebook_loss, d_loss) if ctx.needs_input_grad[1] else None
        d_commit = _add(d_commitment_loss, None if d_loss is None else d_loss * ctx.beta)
        dz, dcb = None, None
        if dq is not None or d_commit is not None or d_codebook is not None:
            dz, dcb = vq_bwd(dq, z, codebook, indices, d_commit, d_codebook, ctx.dim, ctx.estimator)
        return dz, (dcb if d_codebook is not None else None), None, None, None, None, None


def _add(a: Optional[Tensor], b: Optional[Tensor]) -> Optional[Tensor]:
    """a + b for two gradients, either of which may be None (none arrived)."""
    return b if a is None else a if b is None else a + b


def _vq(z, codebook, dim, precision, estimator, with_sums, beta):
    """(quantized, indices, loss, codebook_loss, commitment_loss, counts, sums): through _VQ when a gradient is
    needed."""
    if needs_grad(z, codebook):
        return _VQ.apply(*distinct(z, codebook), dim, precision, estimator, with_sums, beta)
    quantized, indices, loss, counts, sums = vq_fwd(z, codebook, dim, precision, with_sums)
    return quantized, indices, loss * (1.0 + beta), loss, loss, counts, sums


def _prepare(z, codebook, distance: str, dim: int, precision: str):
    _checks.latent(z)
    dim = _checks.channel_dim(dim, z.dim())
    _checks.codebook(codebook, z, dim)
    _checks.choice("distance", distance, _checks.DISTANCES)
    _checks.choice("precision", precision, _checks.PRECISIONS)
    return dim


def nearest_code(z: Tensor, codebook: Tensor, *, distance: str = "l2", dim: int = -1, precision: str = "exact") -> Tensor:
    """Index of the nearest code for every vector of z along `dim`: int64 of z's shape without `dim`.

    Lowest index wins ties; -1 marks a row whose distances are NaN (NaN in z). precision "tf32"/"bf16" lets GPU
    backends use tensor cores and re-score the best candidates in float32.
    """
    dim = _prepare(z, codebook, distance, dim, precision)
    if distance == "cosine":
        codebook = F.normalize(codebook.detach(), dim=-1)
    if needs_grad(z, codebook):  # indices have no gradient: keep autograd out of the search
        z, codebook = z.detach(), codebook.detach()
    return nearest_code_op(z, codebook, dim, precision)


def quantize_with_stats(z, codebook, *, beta=0.25, distance="l2", dim=-1, precision="exact", estimator="ste",
                        with_sums=False) -> tuple[VQResult, Tensor, Tensor, Tensor]:
    """vector_quantize plus the per-code counts (K,) and, with `with_sums`, the per-code sums of the (normalised) z.

    Also returns the vectors the search saw (z, or l2-normalised z for "cosine"), for EMA updates and restarts.
    """
    dim = _prepare(z, codebook, distance, dim, precision)
    beta = _checks.non_negative("beta", beta)
    _checks.choice("estimator", estimator, _checks.ESTIMATORS)
    if distance == "cosine":
        z, codebook = F.normalize(z, dim=dim), F.normalize(codebook, dim=-1)
    quantized, indices, loss, cb_loss, commit_loss, counts, sums = _vq(z, codebook, dim, precision, estimator,
                                                                      with_sums, beta)
    probs = counts / counts.sum(dtype=acc_dtype(loss.dtype)).clamp_min_(1)  # divided in the accumulation dtype
    perplexity = torch.special.entr(probs).sum().exp()
    perplexity = perplexity if perplexity.dtype == loss.dtype else perplexity.to(loss.dtype)
    return VQResult(quantized, indices, loss, cb_loss, commit_loss, perplexity), counts, sums, z


def vector_quantize(z: Tensor, codebook: Tensor, *, beta: float = 0.25, distance: str = "l2", dim: int = -1,
                    precision: str = "exact", estimator: str = "ste") -> VQResult:
    """VQ-VAE's quantization (van den Oord et al. 2017, eq. 3) fused: search, gather, both losses, backward.

    quantized = z + sg(e - z) (estimator "ste") or the rotation trick (Fifty et al. 2024, "rotation");
    codebook_loss = mean((e - sg(z))^2) trains the codebook, commitment_loss = mean((sg(e) - z)^2) the encoder,
    loss = codebook_loss + beta * commitment_loss. `dim` is the channel axis (dim=1 for NCHW).
    """
    return quantize_with_stats(z, codebook, beta=beta, distance=distance, dim=dim, precision=precision,
                               estimator=estimator)[0]
