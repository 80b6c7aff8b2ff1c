"""zalandoresearch/pytorch-vq-vae's VectorQuantizerEMA (the notebook port of Sonnet's EMA quantizer): NCHW
input, returns (loss, quantized, perplexity, encodings), quantizes with the codebook from before the EMA update.

Its EMA state is reproduced as the notebook keeps it: the smoothed cluster sizes are stored back into
_ema_cluster_size, and _ema_w and _embedding.weight are replaced by new Parameters each training step.
The returned `encodings` one-hot is part of its API, so it is still built (from the indices, after the
fused search); the distance matrix and the one-hot products are gone.
"""
from __future__ import annotations

import torch
from torch import nn

from ..ops.vq import quantize_with_stats
from ._base import Adapter, one_hot_perplexity, smoothed_cluster_size


class VectorQuantizerEMA(Adapter):
    name = "zalando VectorQuantizerEMA"
    class_name = "VectorQuantizerEMA"
    attributes = ("_embedding", "_ema_cluster_size", "_ema_w", "_decay", "_epsilon", "_commitment_cost",
                  "_num_embeddings")

    def is_target(self, klass):
        """Any class named VectorQuantizerEMA that defines forward (the notebook is copied, not installed)."""
        return klass.__name__ == self.class_name and "forward" in vars(klass)

    def load(self):
        raise ImportError("zalando's VectorQuantizerEMA lives in a notebook, not a package: patch the model, "
                          "vk.patch(model), or the class, vk.patch(VectorQuantizerEMA)")

    def forward(self, module, inputs):
        update = module.training
        r, counts, sums, _ = quantize_with_stats(inputs, module._embedding.weight.detach(), dim=1, with_sums=update)
        n = r.indices.numel()
        if update:
            with torch.no_grad():
                decay = module._decay
                module._ema_cluster_size = module._ema_cluster_size * decay + (1 - decay) * counts.to(torch.float32)
                module._ema_cluster_size = smoothed_cluster_size(module._ema_cluster_size, module._epsilon)
                module._ema_w = nn.Parameter(module._ema_w * decay + (1 - decay) * sums.to(module._ema_w.dtype))
                module._embedding.weight = nn.Parameter(module._ema_w / module._ema_cluster_size.unsqueeze(1))
        encodings = torch.zeros(n, module._num_embeddings, device=inputs.device)
        encodings.scatter_(1, r.indices.reshape(-1, 1), 1)
        perplexity = one_hot_perplexity(counts, n, torch.float32)
        return module._commitment_cost * r.commitment_loss, r.quantized, perplexity, encodings


ADAPTERS = (VectorQuantizerEMA(),)
