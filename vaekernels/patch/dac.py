"""The DAC lineage's VectorQuantize (descript-audio-codec's dac.nn.quantize and snac.vq): weight-normed 1x1
convolutions project to low-dimensional factorised codes, looked up by cosine similarity.

The lookup runs the fused search with distance="cosine" instead of the N x K distance matrix; z_q is then
gathered from the unnormalised codebook, as the originals return it, with their straight-through output and
(DAC) per-sample commitment and codebook losses (mse with reduction="none", mean over [1, 2]). SNAC's stride
(average pool before, repeat after) is kept.

ResidualVectorQuantize (both packages) runs every level in one autograd node, vk.factorized_residual_quantize,
which keeps no level's D-wide residual for backward. DAC's quantizer dropout draws what the original draws
(torch.randint(1, n + 1, (B,)) from the CPU generator on every training forward, even with dropout 0) and becomes
the op's per-sample depth; training searches every level, eval stops after n_quantizers; the losses are summed
per level in the original's order. Levels whose projections are not plain 1x1 convolutions (weight norm allowed)
keep the package's own loop, with the per-level patch above.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.nn.utils.weight_norm import WeightNorm

from ..ops.rvq import factorized_residual_quantize
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


def _is_projection(conv) -> bool:
    """A 1x1 Conv1d (stride 1, no padding, dilation or groups) with at most torch.nn.utils.weight_norm on its weight
    (the hook; the parametrization computes `weight` itself): a [out, in] matrix for the residual op."""
    return (isinstance(conv, torch.nn.Conv1d) and conv.kernel_size == (1,) and conv.stride == (1,)
            and conv.padding in ((0,), "valid") and conv.dilation == (1,) and conv.groups == 1
            and all(isinstance(h, WeightNorm) and h.name == "weight" for h in conv._forward_pre_hooks.values()))


def _projection(conv):
    """The weight of a conv that _is_projection, as [out, in], with its weight norm applied under autograd."""
    hooks = list(conv._forward_pre_hooks.values())
    return (hooks[0].compute_weight(conv) if hooks else conv.weight).squeeze(-1)


class ResidualVectorQuantize(Adapter):
    """DAC's ResidualVectorQuantize (forward(z, n_quantizers) with quantizer dropout; returns z_q, codes,
    latents, commitment and codebook losses) or SNAC's (forward(z), strided levels; returns z_q and a list of
    codes), by the signature of forward."""
    class_name = "ResidualVectorQuantize"
    attributes = ("quantizers", "n_codebooks")

    def __init__(self, library: str, module: str, install_hint: str, parameters: tuple[str, ...]):
        self.library, self.module, self.install_hint, self.parameters = library, module, install_hint, parameters
        self.name = f"{library.upper()}-style ResidualVectorQuantize"

    def is_target(self, klass):
        forward = vars(klass).get("forward")
        return (klass.__name__ == self.class_name and "from_codes" in vars(klass) and forward is not None
                and tuple(inspect.signature(forward).parameters) == self.parameters)

    def uncovered(self, rvq):
        for i, q in enumerate(rvq.quantizers):
            if not (VECTOR_QUANTIZE.matches(q) and _is_projection(q.in_proj) and _is_projection(q.out_proj)):
                return f"quantizers[{i}] other than a VectorQuantize with 1x1 convolutions"
            if "forward" in vars(q) and not getattr(q, "_vaekernels_patched", False):
                return f"quantizers[{i}] with its own forward"
        return None

    def forward(self, rvq, z, n_quantizers=None):
        quantizers = list(rvq.quantizers)
        depth, n_q = None, n_quantizers
        dac = "n_quantizers" in self.parameters
        if dac:
            n = rvq.n_codebooks
            n_q = n if n_q is None else n_q
            if rvq.training:  # the original's draw, every training forward
                n_q = torch.ones((z.shape[0],)) * n + 1
                dropout = torch.randint(1, n + 1, (z.shape[0],))
                n_dropout = int(z.shape[0] * rvq.quantizer_dropout)
                n_q[:n_dropout] = dropout[:n_dropout]
                n_q = depth = n_q.to(z.device)
            else:
                quantizers = quantizers[:next((i for i in range(n) if i >= n_q), n)]
        r = factorized_residual_quantize(
            z, [q.codebook.weight for q in quantizers], [_projection(q.in_proj) for q in quantizers],
            [_projection(q.out_proj) for q in quantizers], [q.in_proj.bias for q in quantizers],
            [q.out_proj.bias for q in quantizers], strides=[getattr(q, "stride", 1) for q in quantizers],
            depth=depth, distance="cosine")
        if not dac:
            return r.quantized, list(r.indices)
        # the original's sum over levels of (loss_i * mask_i).mean(), level by level (a cumulative sum's last entry)
        mask = torch.arange(len(quantizers), device=z.device)[:, None] < n_q
        commitment_loss, codebook_loss = ((loss * mask).mean(1).cumsum(0)[-1]
                                          for loss in (r.commitment_loss, r.codebook_loss))
        return r.quantized, torch.stack(r.indices, 1), torch.cat(r.latents, 1), commitment_loss, codebook_loss


_DAC_HINT = "descript-audio-codec (pip install --no-deps descript-audio-codec; see docs/patching.md)"
VECTOR_QUANTIZE = VectorQuantize("dac", "dac.nn.quantize", _DAC_HINT)
ADAPTERS = (
    ResidualVectorQuantize("dac", "dac.nn.quantize", _DAC_HINT, ("self", "z", "n_quantizers")),
    ResidualVectorQuantize("snac", "snac.vq", "snac (pip install snac)", ("self", "z")),
    VECTOR_QUANTIZE,
    VectorQuantize("snac", "snac.vq", "snac (pip install snac)"),
)
