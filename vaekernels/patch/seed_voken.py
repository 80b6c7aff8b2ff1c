"""SEED-Voken's IndexPropagationQuantize (IBQ, TencentARC/SEED-Voken src/IBQ/modules/vqvae/quantize.py), and the
copies of it that other repositories ship (recognised by class name and attributes, as taming's quantizer is).

Forward: logits z . embedding over NCHW z, maximum-inner-product index, z_q with the gradient of the softmax of the
logits, the three-term quantization loss with beta and, with use_entropy_loss, MAGVIT-v2's entropy loss at
entropy_temperature with sample_minimization_weight and batch_maximization_weight; diff is the loss, or
(quant_loss, sample_entropy, avg_entropy, entropy_loss). The fused op does all of it without the N x K logits,
softmax and one-hot tensors. remap keeps the original code (with a warning).
"""
from __future__ import annotations

from ..ops.ibq import index_backprop_quantize
from ._base import Adapter

_ATTRIBUTES = ("embedding", "beta", "use_entropy_loss", "entropy_temperature", "sample_minimization_weight",
               "batch_maximization_weight", "remap")


class IndexPropagationQuantize(Adapter):
    name = "SEED-Voken IndexPropagationQuantize"
    class_name = "IndexPropagationQuantize"
    attributes = _ATTRIBUTES

    def is_target(self, klass):
        """Any class named IndexPropagationQuantize that defines forward: the quantizer lives in repositories."""
        return klass.__name__ == self.class_name and "forward" in vars(klass)

    def uncovered(self, module):
        return "remap" if module.remap is not None else None

    def forward(self, module, z, temp=None, return_logits=False):
        """(z_q, diff, (None, None, indices)) of IndexPropagationQuantize.forward (temp and return_logits are
        accepted and unused there too)."""
        r = index_backprop_quantize(z, module.embedding.weight, dim=1, beta=module.beta,
                                    entropy_temperature=module.entropy_temperature,
                                    sample_entropy_weight=module.sample_minimization_weight,
                                    codebook_entropy_weight=module.batch_maximization_weight,
                                    entropy=bool(module.use_entropy_loss))
        diff = r.quant_loss
        if module.use_entropy_loss:
            diff = (r.quant_loss, r.per_sample_entropy, r.codebook_entropy, r.entropy_loss)
        return r.quantized, diff, (None, None, r.indices.reshape(-1))


ADAPTERS = (IndexPropagationQuantize(),)
