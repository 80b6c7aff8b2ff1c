"""Reparameterization and Gaussian KL in plain PyTorch (accumulating in float32, or float64 for float64)."""
from __future__ import annotations

import torch

from . import philox


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _eps(seed: torch.Tensor, mu: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the seed stays a tensor on mu's device: no host synchronisation on a GPU
    return philox.randn(seed.to(mu.device), mu.numel(), device=mu.device).view(mu.shape).to(dtype)


def _kl(mu, logvar, prior_mu, prior_logvar):
    """Elementwise KL(N(mu, exp(lv)) || prior)."""
    diff = mu if prior_mu is None else mu - prior_mu
    if prior_logvar is None:
        return 0.5 * (torch.exp(logvar) + diff * diff - 1.0 - logvar)
    return 0.5 * (prior_logvar - logvar + (torch.exp(logvar) + diff * diff) * torch.exp(-prior_logvar) - 1.0)


def _f(t, dtype):
    return None if t is None else t.to(dtype)


def gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
    acc = acc_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    z = None
    if seed is not None:
        z = (m + torch.exp(0.5 * lv) * _eps(seed, mu, acc)).to(mu.dtype)
    if kl_mode == "none":
        return z, None
    kl = _kl(m, lv, _f(prior_mu, acc), _f(prior_logvar, acc))
    if kl_mode == "elementwise":
        return z, kl.to(mu.dtype)
    if kl_mode == "sum":
        return z, kl.sum() * kl_scale
    per_row = kl.reshape(mu.shape[0], -1)
    return z, (per_row.sum(1) if kl_mode == "sample" else per_row.sum(0)) * kl_scale


def gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, kl_mode):
    acc = acc_dtype(mu.dtype)
    m, lv = mu.to(acc), logvar.to(acc)
    dlv = torch.zeros_like(lv)
    dmu = dpmu = dplv = None
    if dz is not None and seed is not None:
        dlv = dlv + 0.5 * dz.to(acc) * torch.exp(0.5 * lv) * _eps(seed, mu, acc)
    if dkl is not None:
        w = dkl.to(acc)
        if kl_mode == "latent":
            w = w.expand(mu.shape[0], w.numel()).reshape(mu.shape)
        elif kl_mode == "sample":
            w = w.reshape(-1, *([1] * (mu.dim() - 1)))
        var = torch.exp(lv)
        diff = m if prior_mu is None else m - prior_mu.to(acc)
        if prior_logvar is None:  # dKL/dmu = diff, dKL/dlogvar = (var - 1) / 2
            dmu = w * diff
            dlv = dlv + w * 0.5 * (var - 1.0)
        else:  # prior variance p: diff / p, (var / p - 1) / 2; dKL/dprior_logvar = (1 - (var + diff^2) / p) / 2
            inv_pvar = torch.exp(-prior_logvar.to(acc))
            dmu = w * diff * inv_pvar
            dlv = dlv + w * 0.5 * (var * inv_pvar - 1.0)
            dplv = (w * 0.5 * (1.0 - (var + diff * diff) * inv_pvar)).to(prior_logvar.dtype)
        if prior_mu is not None:
            dpmu = (-dmu).to(prior_mu.dtype)
        if dz is not None:
            dmu = dmu + dz.to(acc)
        dmu = dmu.to(mu.dtype)
    return dmu, dlv.to(logvar.dtype), dpmu, dplv
