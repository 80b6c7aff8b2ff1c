"""A convolutional VAE whose bottleneck is the fused reparameterization + KL op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import eager as eager_ops
from ..ops.gaussian import reparameterize_kl
from ._blocks import decoder, encoder


class ConvVAE(nn.Module):
    """8x8 images -> a `latent_dim` Gaussian latent -> 8x8 reconstructions (logits).

    The convolutions map 8x8 images to (channels, 4, 4) features and back; linear layers map those to the
    latent's mu and logvar and back. A small vector latent (16 dimensions for the 8x8 digits) lets samples from
    the N(0, I) prior decode to whole digits. Training objective: reconstruction (binary cross-entropy, summed
    over pixels, batch mean) plus `kl_weight` times the KL with `free_bits` nats per latent dimension
    (`reparameterize_kl(..., free_bits=)`), `kl_weight` rising linearly from 0 to 1 over the first
    `kl_warmup` training steps (`after_step`): without both the posterior collapses onto the prior in a few
    hundred steps, and reconstructions and samples are grey blurs. `eager=True` trains the same objective with
    the eager formulas."""

    def __init__(self, latent_dim: int = 16, width: int = 64, channels: int = 32, *, free_bits: float = 1.5,
                 kl_warmup: int = 100, eager: bool = False):
        super().__init__()
        self.latent_dim, self.free_bits, self.kl_warmup, self.eager = latent_dim, free_bits, kl_warmup, eager
        self.encoder = nn.Sequential(encoder(channels, width), nn.Flatten(), nn.SiLU(),
                                     nn.Linear(16 * channels, 2 * latent_dim))
        self.decoder = nn.Sequential(nn.Linear(latent_dim, 16 * channels), nn.SiLU(),
                                     nn.Unflatten(1, (channels, 4, 4)), decoder(channels, width))
        self.register_buffer("kl_weight", torch.tensor(0.0 if kl_warmup > 0 else 1.0))

    def after_step(self, step: int) -> None:
        """KL warm-up: after training step `step` (0-based) the KL weight is min(1, (step + 1) / kl_warmup)."""
        if self.kl_warmup > 0:
            self.kl_weight.fill_(min(1.0, (step + 1) / self.kl_warmup))

    def forward(self, x: torch.Tensor) -> dict:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        if self.eager:
            z = eager_ops.reparameterize(mu, logvar)
            kl = eager_ops.gaussian_kl(mu, logvar, free_bits=self.free_bits)
        else:
            z, kl = reparameterize_kl(mu, logvar, free_bits=self.free_bits)
        recon = self.decoder(z)
        rec = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / x.shape[0]
        return {"loss": rec + self.kl_weight * kl, "recon": torch.sigmoid(recon), "kl": kl, "rec": rec}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the posterior means (no sampling)."""
        mu, _ = self.encoder(x).chunk(2, dim=1)
        return torch.sigmoid(self.decoder(mu))

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        """`n` images decoded from the N(0, I) prior."""
        device = next(self.parameters()).device
        return torch.sigmoid(self.decoder(torch.randn(n, self.latent_dim, device=device)))
