"""Reparameterization and Gaussian KL in plain PyTorch (accumulating in float32, or float64 for float64).

Written for few passes over memory, since on the CPU this backend is what "auto" runs: eps comes from torch's own
generator on CPU tensors (seeded from the op's seed) and from the tensor Philox of `tl.randn` elsewhere; the KL is
one elementwise expression built in place; the backward takes sigma * eps as z - mu from the saved sample when it
has one in float32/float64, else regenerates eps from the seed.
"""
from __future__ import annotations

import threading

import torch

from . import philox

_local = threading.local()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _cpu_generator(seed: torch.Tensor) -> torch.Generator:
    """This thread's CPU generator, re-seeded from the op's seed (creating one per call costs more than seeding)."""
    gen = getattr(_local, "generator", None)
    if gen is None:
        gen = _local.generator = torch.Generator()
    return gen.manual_seed(int(seed))


def noise(seed: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """eps ~ N(0, I) of `like`'s shape for the op's 0-d seed: torch's generator on CPU tensors (as fast as
    torch.randn), the Philox stream of Triton's tl.randn(seed, flat index) on other devices (the seed stays on the
    device: no host synchronisation). A fresh tensor, free to be overwritten."""
    if like.is_cpu:  # torch.randn(like.shape, ...)'s numbers (like is contiguous), with less argument parsing
        return torch.empty_like(like, dtype=dtype).normal_(generator=_cpu_generator(seed))
    return philox_noise(seed, like, dtype)


def philox_noise(seed: torch.Tensor, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """eps of `like`'s shape from the Philox stream of tl.randn(seed, flat index): what the GPU backends draw."""
    return philox.randn(seed.to(like.device), like.numel(), device=like.device).view(like.shape).to(dtype)


def _twice_kl(mu, logvar, prior_mu, prior_logvar) -> torch.Tensor:
    """2 * elementwise KL(N(mu, exp(lv)) || prior) in a fresh tensor; expm1 keeps the near-prior terms exact."""
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:  # exp(lv) - 1 - lv + diff^2
        return torch.expm1(logvar).sub_(logvar).addcmul_(diff, diff)
    inv_pvar = torch.exp(-prior_logvar)  # plv - lv + (exp(lv) + diff^2) / pvar - 1
    return torch.exp(logvar).addcmul_(diff, diff).mul_(inv_pvar).add_(prior_logvar).sub_(logvar).sub_(1.0)


def _sigma(logvar: torch.Tensor) -> torch.Tensor:
    """exp(0.5 * logvar), the standard deviation (torch.pow(sqrt(e), logvar) is one op but 4x slower per element)."""
    return torch.mul(logvar, 0.5).exp_()


def _f(t, dtype):
    """t in dtype (None stays None), without a call when it already is: this path is timed per call on the CPU."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
    acc = acc_dtype(mu.dtype)
    m, lv = _f(mu, acc), _f(logvar, acc)
    z = None
    if seed is not None:
        eps = noise(seed, mu, acc)
        z = _f(torch.addcmul(m, eps, _sigma(lv), out=eps), mu.dtype)
    if kl_mode == "none":
        return z, None
    kl2 = _twice_kl(m, lv, _f(prior_mu, acc), _f(prior_logvar, acc))
    if kl_mode == "elementwise":
        return z, _f(kl2.mul_(0.5), mu.dtype)
    if kl_mode == "sum":
        return z, kl2.sum() * (0.5 * kl_scale)
    per_row = kl2.view(mu.shape[0], -1)
    return z, (per_row.sum(1) if kl_mode == "sample" else per_row.sum(0)).mul_(0.5 * kl_scale)


def _kl_weight(dkl, mu, kl_mode, acc):
    """The KL output's gradient shaped to broadcast against mu: one weight per latent ("latent", mu's shape without
    dim 0) or per sample ("sample", one per index of dim 0), else as it is (0-d, or mu's shape)."""
    w = _f(dkl, acc)
    if kl_mode == "latent":
        return w.view(mu.shape[1:])
    if kl_mode == "sample":
        return w.view((-1,) + (1,) * (mu.dim() - 1))
    return w


def gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale):
    acc = acc_dtype(mu.dtype)
    m, lv = _f(mu, acc), _f(logvar, acc)
    dpmu = dplv = dz_sigma_eps = None
    if dz is not None and seed is not None:  # dz * d(sigma eps)/dlv = 0.5 dz sigma eps
        if z is not None and z.dtype in (torch.float32, torch.float64):
            dz_sigma_eps = torch.sub(_f(z, acc), m).mul_(dz)
        else:
            dz_sigma_eps = noise(seed, mu, acc).mul_(_sigma(lv)).mul_(dz)
    if dkl is None:
        dlv = torch.zeros_like(lv) if dz_sigma_eps is None else dz_sigma_eps.mul_(0.5)
        return None, _f(dlv, logvar.dtype), None, None
    # the KL's gradients, weighted by w * kl_scale: addcmul's value carries the scale, else it joins w (0-d or small
    # unless elementwise) before the one pass over the elements
    w = _kl_weight(dkl, mu, kl_mode, acc)
    diff = m if prior_mu is None else m - _f(prior_mu, acc)
    if prior_logvar is None:  # dKL/dmu = diff, dKL/dlogvar = (var - 1) / 2
        dlv_kl, dmu_kl = torch.expm1(lv), diff
    else:  # prior variance p: diff / p, (var / p - 1) / 2; dKL/dprior_logvar = (1 - (var + diff^2) / p) / 2
        inv_pvar = torch.exp(-_f(prior_logvar, acc))
        var_p = torch.exp(lv).mul_(inv_pvar)
        dlv_kl, dmu_kl = var_p - 1.0, diff * inv_pvar
        dplv = _f((1.0 - var_p - diff * diff * inv_pvar).mul_(w * (0.5 * kl_scale)), prior_logvar.dtype)
    if dz_sigma_eps is None:
        dlv = dlv_kl.mul_(w * (0.5 * kl_scale))
    else:
        dlv = torch.addcmul(dz_sigma_eps, dlv_kl, w, value=kl_scale, out=dlv_kl).mul_(0.5)
    if prior_mu is not None or dz is None:
        dmu = torch.mul(dmu_kl, w * kl_scale)
        if prior_mu is not None:
            dpmu = _f(-dmu, prior_mu.dtype)
        if dz is not None:
            dmu = dmu.add_(dz)
    else:
        dmu = torch.addcmul(_f(dz, acc), dmu_kl, w, value=kl_scale)
    return _f(dmu, mu.dtype), _f(dlv, logvar.dtype), dpmu, dplv
