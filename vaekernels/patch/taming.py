"""taming-transformers' VectorQuantizer2 (the VQGAN quantizer, also copied by latent-diffusion and diffusers).

Forward: nearest code on NCHW latents, codebook and commitment losses with the legacy beta placement
(legacy=True puts beta on the codebook term), straight-through output, optional index remapping and
(B, H, W) indices. The fused op does search, gather, both losses and the backward without the N x K distances.
"""
from __future__ import annotations

from ..ops.vq import quantize_with_stats
from ._base import Adapter

_ATTRIBUTES = ("embedding", "beta", "legacy", "remap", "sane_index_shape")


def vqgan_forward(module, z):
    """(z_q, loss, (None, None, indices)) of VectorQuantizer2.forward for NCHW z, on the fused op."""
    r = quantize_with_stats(z, module.embedding.weight, dim=1)[0]
    if module.legacy:
        loss = r.commitment_loss + module.beta * r.codebook_loss
    else:
        loss = module.beta * r.commitment_loss + r.codebook_loss
    indices = r.indices.reshape(-1)
    if module.remap is not None:
        indices = module.remap_to_used(indices.reshape(z.shape[0], -1)).reshape(-1, 1)
    if module.sane_index_shape:
        indices = indices.reshape(z.shape[0], z.shape[2], z.shape[3])
    return r.quantized, loss, (None, None, indices)


class VectorQuantizer2(Adapter):
    name = "taming VectorQuantizer2"
    class_name = "VectorQuantizer2"
    attributes = _ATTRIBUTES
    module = "taming.modules.vqvae.quantize"
    install_hint = "taming-transformers (pip install taming-transformers)"

    def is_target(self, klass):
        """Any class named VectorQuantizer2 that defines forward: latent-diffusion and others ship copies."""
        return klass.__name__ == self.class_name and "forward" in vars(klass)

    def forward(self, module, z, temp=None, rescale_logits=False, return_logits=False):
        assert temp is None or temp == 1.0, "Only for interface compatible with Gumbel"
        assert not rescale_logits, "Only for interface compatible with Gumbel"
        assert not return_logits, "Only for interface compatible with Gumbel"
        return vqgan_forward(module, z)


ADAPTERS = (VectorQuantizer2(),)
