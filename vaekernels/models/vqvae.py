"""A convolutional VQ-VAE whose bottleneck is the fused nearest-code search, losses, gradient and EMA statistics."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import eager as eager_ops
from ..nn import VectorQuantizer
from ._blocks import decoder, encoder


class ConvVQVAE(nn.Module):
    """8x8 images -> (code_dim, 4, 4) latents quantized against `num_codes` EMA codes -> 8x8 reconstructions."""

    def __init__(self, num_codes: int = 64, code_dim: int = 16, width: int = 64, *, beta: float = 0.25,
                 eager: bool = False):
        super().__init__()
        self.eager = eager
        self.encoder = encoder(code_dim, width)
        self.quantizer = VectorQuantizer(num_codes, code_dim, beta=beta, ema=True, dim=1)
        self.decoder = decoder(code_dim, width)

    def after_step(self, step: int, every: int = 25) -> None:
        """Every `every` training steps, re-seed the codes no batch used since the last restart."""
        if step % every == every - 1:
            self.quantizer.restart_dead_codes(threshold=1.0)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.encoder(x)
        if self.eager:
            vq = self.quantizer
            q, idx, vq_loss = eager_ops.vector_quantize(h, vq.codebook.clone(), vq.beta, dim=1)
            counts, sums = eager_ops.ema_statistics(h.detach().movedim(1, -1).reshape(-1, h.shape[1]),
                                                    idx.flatten(), vq.num_codes)
            if self.training:
                vq._observe(counts, sums)
            probs = counts / idx.numel()
            perplexity = torch.exp(-torch.special.xlogy(probs, probs).sum())
        else:
            out = self.quantizer(h)
            q, idx, vq_loss, perplexity = out.quantized, out.indices, out.loss, out.perplexity
        recon = self.decoder(q)
        rec = F.binary_cross_entropy_with_logits(recon, x, reduction="sum") / x.shape[0]
        return {"loss": rec + vq_loss, "recon": torch.sigmoid(recon), "indices": idx, "perplexity": perplexity,
                "rec": rec}

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Images decoded from the quantized latents (in eval mode, EMA statistics untouched)."""
        was_training = self.training
        recon = self.eval()(x)["recon"]
        self.train(was_training)
        return recon
