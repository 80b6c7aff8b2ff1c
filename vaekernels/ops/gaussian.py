"""reparameterize, gaussian_kl and reparameterize_kl: one torch.library op pair (forward, backward) for all three.

`gaussian_fwd` samples z (when given a seed) and/or computes the KL in one pass; `gaussian_bwd` produces every
gradient in one pass, regenerating eps from the seed (or, on CPU tensors, reading sigma * eps as z - mu) instead
of storing it. `_Gaussian` is their autograd (see `_library` for the structure).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend, _checks, eager
from ..reference.gaussian import acc_dtype
from ..reference.philox import draw_seed
from ._library import Op, distinct, needs_grad


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _kl_shape(mu: Tensor, kl_mode: str) -> tuple[tuple, torch.dtype]:
    if kl_mode == "elementwise":
        return tuple(mu.shape), mu.dtype
    if kl_mode == "sum":
        return (), acc_dtype(mu.dtype)
    if kl_mode == "latent":
        return (mu.numel() // mu.shape[0],), acc_dtype(mu.dtype)
    if kl_mode == "sample":
        return (mu.shape[0],), acc_dtype(mu.dtype)
    return (0,), mu.dtype


def _gaussian_fwd(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Optional[Tensor],
    prior_logvar: Optional[Tensor],
    seed: Optional[Tensor],
    kl_mode: str,
    kl_scale: float,
) -> tuple[Tensor, Tensor]:
    impl = _backend.implementation("gaussian_fwd", mu.device, (mu.numel(),))
    return impl.gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale)


def _gaussian_fwd_fake(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
    shape, dtype = _kl_shape(mu, kl_mode)
    z = torch.empty_like(mu) if seed is not None else _empty(mu)
    return z, mu.new_empty(shape, dtype=dtype)


def _gaussian_bwd(
    dz: Optional[Tensor],
    dkl: Optional[Tensor],
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Optional[Tensor],
    prior_logvar: Optional[Tensor],
    seed: Optional[Tensor],
    z: Optional[Tensor],
    kl_mode: str,
    kl_scale: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    impl = _backend.implementation("gaussian_bwd", mu.device, (mu.numel(),))
    return impl.gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale)


def _gaussian_bwd_fake(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale):
    dmu = torch.empty_like(mu) if dkl is not None else _empty(mu)
    dpmu = torch.empty_like(prior_mu) if prior_mu is not None and dkl is not None else _empty(mu)
    dplv = torch.empty_like(prior_logvar) if prior_logvar is not None and dkl is not None else _empty(mu)
    return dmu, torch.empty_like(logvar), dpmu, dplv


gaussian_fwd = Op("gaussian_fwd", _gaussian_fwd, _gaussian_fwd_fake)
gaussian_bwd = Op("gaussian_bwd", _gaussian_bwd, _gaussian_bwd_fake)


class _Gaussian(torch.autograd.Function):
    """Autograd for gaussian_fwd: saves the inputs, the seed and (for CPU tensors, whose reference backward reads
    sigma * eps as z - mu) the sample; never eps."""

    @staticmethod
    def forward(ctx, mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
        z, kl = gaussian_fwd(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale)
        sample = z if seed is not None and mu.is_cpu else None
        ctx.save_for_backward(mu, logvar, prior_mu, prior_logvar, seed, sample)
        ctx.kl_mode, ctx.kl_scale = kl_mode, kl_scale
        ctx.set_materialize_grads(False)
        return z, kl

    @staticmethod
    def backward(ctx, dz, dkl):
        mu, logvar, prior_mu, prior_logvar, seed, sample = ctx.saved_tensors
        if seed is None:
            dz = None
        if ctx.kl_mode == "none":
            dkl = None
        if dz is None and dkl is None:
            return (None,) * 7
        dmu, dlogvar, dpmu, dplv = gaussian_bwd(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, sample,
                                                ctx.kl_mode, ctx.kl_scale)
        if dkl is None:
            dmu, dpmu, dplv = dz, None, None
        return (dmu, dlogvar, dpmu if prior_mu is not None else None, dplv if prior_logvar is not None else None,
                None, None, None)


def _gaussian(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale) -> tuple[Tensor, Tensor]:
    """gaussian_fwd with autograd when some input needs a gradient, the bare operator otherwise."""
    if needs_grad(mu, logvar, prior_mu, prior_logvar):
        return _Gaussian.apply(*distinct(mu, logvar, prior_mu, prior_logvar), seed, kl_mode, kl_scale)
    return gaussian_fwd(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale)


def _pair(mu, logvar) -> tuple[Tensor, Tensor]:
    _checks.float_tensor("mu", mu)
    _checks.float_tensor("logvar", logvar)
    _checks.same_shape("mu", mu, "logvar", logvar)
    _checks.same_device("mu", mu, "logvar", logvar)
    if logvar.dtype != mu.dtype:
        raise TypeError(f"logvar must have mu's dtype {mu.dtype}, got {logvar.dtype}")
    return mu.contiguous(), logvar.contiguous()


def _prior(name: str, p, mu: Tensor):
    """A prior parameter broadcast to mu's shape (the expand's backward sums its gradient back)."""
    if p is None:
        return None
    _checks.float_tensor(name, p)
    _checks.same_device("mu", mu, name, p)
    if p.dtype != mu.dtype:
        raise TypeError(f"{name} must have mu's dtype {mu.dtype}, got {p.dtype}")
    try:
        return p.expand_as(mu).contiguous()
    except RuntimeError:
        raise ValueError(f"{name} of shape {tuple(p.shape)} does not broadcast to mu's shape {tuple(mu.shape)}") from None


def _kl_plan(mu: Tensor, reduction: str, free_bits: float) -> tuple[str, float]:
    """(kl_mode, kl_scale) for the forward op."""
    _checks.choice("reduction", reduction, _checks.REDUCTIONS)
    free_bits = _checks.free_bits(free_bits, reduction)
    if reduction in ("batchmean", "per_sample") and mu.dim() == 0:
        raise ValueError(f"reduction={reduction!r} needs mu with a batch dimension, got a 0-d tensor")
    if free_bits > 0:
        return "latent", 1.0
    if reduction == "none":
        return "elementwise", 1.0
    if reduction == "sum":
        return "sum", 1.0
    if reduction == "per_sample":
        return "sample", 1.0
    return "sum", 1.0 / (mu.numel() if reduction == "mean" else mu.shape[0])


def _finish_kl(kl: Tensor, mu: Tensor, free_bits: float) -> Tensor:
    if free_bits > 0:
        kl = torch.clamp(kl / mu.shape[0], min=free_bits).sum()
    return kl if kl.dtype == mu.dtype else kl.to(mu.dtype)


def reparameterize(mu: Tensor, logvar: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """z = mu + exp(0.5 logvar) * eps with eps ~ N(0, I) drawn in the kernel (Philox); eps is never stored.

    The seed comes from torch's generator (or `generator`), so `torch.manual_seed` reproduces z.
    """
    mu, logvar = _pair(mu, logvar)
    seed = draw_seed(mu.device, generator)
    if mu.numel() == 0:
        return mu + logvar
    z, _ = _gaussian(mu, logvar, None, None, seed, "none", 1.0)
    return z


def gaussian_kl(
    mu: Tensor,
    logvar: Tensor,
    prior_mu: Tensor | None = None,
    prior_logvar: Tensor | None = None,
    *,
    reduction: str = "batchmean",
    free_bits: float = 0.0,
) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(prior_mu, exp(prior_logvar))), the prior N(0, I) by default.

    reduction: "none" | "sum" | "mean" | "batchmean" (sum / size of dim 0) | "per_sample" (sum over all but
    dim 0, one value per sample, as diffusers' posterior.kl()). free_bits > 0 (batchmean only):
    sum over latents of max(free_bits, batch mean of that latent's KL). Priors broadcast to mu's shape.
    """
    mu, logvar = _pair(mu, logvar)
    prior_mu, prior_logvar = _prior("prior_mu", prior_mu, mu), _prior("prior_logvar", prior_logvar, mu)
    kl_mode, kl_scale = _kl_plan(mu, reduction, free_bits)
    if mu.numel() == 0:
        return eager.gaussian_kl(mu, logvar, prior_mu, prior_logvar, reduction, free_bits)
    _, kl = _gaussian(mu, logvar, prior_mu, prior_logvar, None, kl_mode, kl_scale)
    return _finish_kl(kl, mu, free_bits)


def reparameterize_kl(
    mu: Tensor,
    logvar: Tensor,
    *,
    reduction: str = "batchmean",
    free_bits: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """(reparameterize(mu, logvar), gaussian_kl(mu, logvar)) in one fused pass forward and one backward."""
    mu, logvar = _pair(mu, logvar)
    kl_mode, kl_scale = _kl_plan(mu, reduction, free_bits)
    seed = draw_seed(mu.device, generator)
    if mu.numel() == 0:
        return mu + logvar, eager.gaussian_kl(mu, logvar, reduction=reduction, free_bits=free_bits)
    z, kl = _gaussian(mu, logvar, None, None, seed, kl_mode, kl_scale)
    return z, _finish_kl(kl, mu, free_bits)
