"""The eager PyTorch formulas users write today: the baseline in the demo and benchmarks, and a test oracle.

Written the usual way on purpose: nearest_code and vector_quantize materialise the N x K distance matrix.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def reparameterize(mu, logvar, generator=None):
    eps = torch.randn(mu.shape, dtype=mu.dtype, device=mu.device, generator=generator)
    return mu + torch.exp(0.5 * logvar) * eps


def gaussian_kl(mu, logvar, prior_mu=None, prior_logvar=None, reduction="batchmean", free_bits=0.0):
    if prior_mu is None and prior_logvar is None:
        kl = 0.5 * (torch.exp(logvar) + mu * mu - 1.0 - logvar)
    else:
        pmu = torch.zeros_like(mu) if prior_mu is None else prior_mu
        plv = torch.zeros_like(mu) if prior_logvar is None else prior_logvar
        kl = 0.5 * (plv - logvar + (torch.exp(logvar) + (mu - pmu) ** 2) / torch.exp(plv) - 1.0)
    if free_bits > 0:
        return torch.clamp(kl.reshape(kl.shape[0], -1).mean(0), min=free_bits).sum()
    if reduction == "none":
        return kl
    if reduction == "sum":
        return kl.sum()
    if reduction == "per_sample":
        return kl.reshape(kl.shape[0], -1).sum(1)
    if reduction == "mean":
        return kl.mean()
    return kl.sum() / kl.shape[0]


def nearest_code(z, codebook, distance="l2", dim=-1):
    zr = z.movedim(dim, -1).reshape(-1, z.shape[dim])
    if distance == "cosine":
        zr, codebook = F.normalize(zr, dim=-1), F.normalize(codebook, dim=-1)
    return torch.cdist(zr, codebook).argmin(1).view(z.movedim(dim, -1).shape[:-1])


def vector_quantize(z, codebook, beta=0.25, distance="l2", dim=-1):
    """(quantized, indices, loss) of VQ-VAE's eq. 3 with the straight-through estimator."""
    zm = z.movedim(dim, -1)
    if distance == "cosine":
        zm, codebook = F.normalize(zm, dim=-1), F.normalize(codebook, dim=-1)
    idx = torch.cdist(zm.reshape(-1, zm.shape[-1]), codebook).argmin(1)
    e = codebook[idx].view(zm.shape)
    loss = F.mse_loss(e, zm.detach()) + beta * F.mse_loss(zm, e.detach())
    quantized = zm + (e - zm).detach()
    return quantized.movedim(-1, dim), idx.view(zm.shape[:-1]), loss


def ema_statistics(z_rows, indices, num_codes):
    """Per-code counts and sums of z through an N x K one-hot, as EMA quantizers usually compute them."""
    onehot = F.one_hot(indices, num_codes).type(z_rows.dtype)
    return onehot.sum(0), onehot.t() @ z_rows
