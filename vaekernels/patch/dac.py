"""The DAC lineage's VectorQuantize (descript-audio-codec's dac.nn.quantize and snac.vq): weight-normed 1x1
convolutions project to low-dimensional factorised codes, looked up by cosine similarity.

The lookup runs the fused search with distance="cosine" instead of the N x K distance matrix; z_q is then
gathered from the unnormalised codebook, as the originals return it, with their straight-through output and
(DAC) per-sample commitment and codebook losses (mse with reduction="none", mean over [1, 2]). SNAC's stride
(average pool before, repeat after) is kept. ResidualVectorQuantize is not replaced: its quantizer dropout
(torch.randint(1, n + 1, (B,)) on every training forward), masks, residuals and eval early stop stay its own code.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..ops.vq import nearest_code
from ._base import Adapter


class VectorQuantize(Adapter):
    class_name = "VectorQuantize"
    methods = ("forward", "decode_latents")
    attributes = ("in_proj", "out_proj", "codebook", "codebook_size", "codebook_dim")

    def __init__(self, library: str, module: str, install_hint: str):
        self.library, self.module, self.install_hint = library, module, install_hint
        self.name = "DAC-style VectorQuantize"

    def is_target(self, klass):
        """Any class named VectorQuantize defining forward and decode_latents (copies of DAC's and SNAC's)."""
        return klass.__name__ == self.class_name and all(m in vars(klass) for m in self.methods)

    def decode_latents(self, q, latents):
        """The nearest codes by cosine; a row with NaN gets index -1 and a NaN code (never a plausible one)."""
        indices = nearest_code(latents, q.codebook.weight, distance="cosine", dim=1)
        codes = q.decode_code(indices.clamp_min(0))
        return codes.masked_fill((indices < 0).unsqueeze(1), float("nan")), indices

    def forward(self, q, z):
        stride = getattr(q, "stride", None)  # SNAC's quantizer has one and returns (z_q, indices)
        if stride is not None and stride > 1:
            z = F.avg_pool1d(z, stride, stride)
        z_e = q.in_proj(z)
        z_q, indices = q.decode_latents(z_e)
        if stride is None:
            commitment_loss = F.mse_loss(z_e, z_q.detach(), reduction="none").mean([1, 2])
            codebook_loss = F.mse_loss(z_q, z_e.detach(), reduction="none").mean([1, 2])
        z_q = q.out_proj(z_e + (z_q - z_e).detach())
        if stride is None:
            return z_q, commitment_loss, codebook_loss, indices, z_e
        if stride > 1:
            z_q = z_q.repeat_interleave(stride, dim=-1)
        return z_q, indices


ADAPTERS = (
    VectorQuantize("dac", "dac.nn.quantize", "descript-audio-codec (pip install --no-deps descript-audio-codec; "
                   "see docs/patching.md)"),
    VectorQuantize("snac", "snac.vq", "snac (pip install snac)"),
)
