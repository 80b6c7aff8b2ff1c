"""A convolutional VAE whose bottleneck is the fused reparameterization + KL op."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import eager as eager_ops
from ..ops.gaussian import reparameterize_kl
from ._blocks import decoder, encoder


class ConvVAE(nn.Module):
    """8x8 images -> latent (latent_channels, 4, 4) Gaussian -> 8x8 reconstructions (logits)."""

    def __init__(self, latent_channels: int = 4, width: int = 64, *, eager: bool = False):
        super().__init__()
        self.latent_channels, self.eager = latent_channels, eager
        self.encoder = encoder(2 * latent_channels, width)
        self.decoder = decoder(latent_channels, width)

    def forward(self, x: torch.Tensor) -> dict:
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        if self.eager:
            z = eager_ops.reparameterize(mu, logvar)
            kl = eager_ops.gaussian_kl(mu, logvar)
        else:
            z, kl = reparameterize_kl(mu, logvar)
        recon = self.decoder(z)
        rec = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / x.shape[0]
        return {"loss": rec + kl, "recon": torch.sigmoid(recon), "kl": kl, "rec": rec}

    @torch.no_grad()
    def sample(self, n: int) -> torch.Tensor:
        device = next(self.parameters()).device
        z = torch.randn(n, self.latent_channels, 4, 4, device=device)
        return torch.sigmoid(self.decoder(z))
