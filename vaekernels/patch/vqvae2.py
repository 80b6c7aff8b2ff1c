"""rosinality/vq-vae-2-pytorch's Quantize (Sonnet's EMA quantizer): channel-last input, codebook stored as
(dim, n_embed) buffers, EMA update with Laplace smoothing in training, returns (quantize, diff, embed_ind).

The EMA statistics come from the fused op's per-code counts and sums instead of the N x K one-hot product.
"""
from __future__ import annotations

import torch

from ..ops.vq import quantize_with_stats
from ._base import Adapter, all_reduce_, smoothed_cluster_size, snapshot


class Quantize(Adapter):
    name = "vq-vae-2 Quantize"
    class_name = "Quantize"
    attributes = ("dim", "n_embed", "decay", "eps", "embed", "cluster_size", "embed_avg")
    module = "vqvae"
    install_hint = ("rosinality/vq-vae-2-pytorch, which is not on PyPI: put a clone on sys.path (its vqvae.py "
                    "defines Quantize) or patch the class itself: vk.patch(Quantize)")

    def is_target(self, klass):
        """Any class named Quantize that defines forward (the repo is copied, not installed)."""
        return klass.__name__ == self.class_name and "forward" in vars(klass)

    def forward(self, module, input):
        update = module.training
        codebook = snapshot(module.embed.t())
        r, counts, sums, _ = quantize_with_stats(input, codebook, dim=-1, with_sums=update)
        if update:
            with torch.no_grad():
                onehot_sum = all_reduce_(counts.to(input.dtype))
                embed_sum = all_reduce_(sums.t().to(input.dtype))
                module.cluster_size.data.mul_(module.decay).add_(onehot_sum, alpha=1 - module.decay)
                module.embed_avg.data.mul_(module.decay).add_(embed_sum, alpha=1 - module.decay)
                cluster_size = smoothed_cluster_size(module.cluster_size, module.eps)
                module.embed.data.copy_(module.embed_avg / cluster_size.unsqueeze(0))
        return r.quantized, r.commitment_loss, r.indices


ADAPTERS = (Quantize(),)
