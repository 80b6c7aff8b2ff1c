"""vector-quantize-pytorch's LFQ (and so ResidualLFQ and GroupedResidualLFQ, whose layers are LFQ modules).

Covered: the defaults, spherical (BSQ), num_codebooks > 1, codebook_scale, the commitment loss, projections
(cosine or linear project_in), channel_first both ways and image/video maps, soft_clamp_input_value,
experimental_softplus_entropy_loss, masks (the losses over the masked tokens, and, as the library computes it
there, a "batch" entropy equal to the per-sample one), inv_temperature,
return_loss_breakdown, eval mode. The entropy terms run in vk.lookup_free_quantize with entropy="clamped" (the
library's formula), which never forms the tokens x 2^K probability matrix. With frac_per_sample_entropy < 1 the
patched module computes the exact full-batch value instead of a random subsample (one warning says so).
"""
from __future__ import annotations

import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lfq import lookup_free_quantize
from ._base import Adapter, Uncovered

_MODULE = "vector_quantize_pytorch.lookup_free_quantization"
INSTALL_HINT = "vector-quantize-pytorch (pip install vector-quantize-pytorch)"  # for every adapter of the package
_warned_frac = False


def _warn_frac() -> None:
    global _warned_frac
    if not _warned_frac:
        _warned_frac = True
        warnings.warn("vaekernels.patch: vector-quantize-pytorch LFQ with frac_per_sample_entropy < 1 computes the "
                      "exact entropies over the full batch (no token subsampling), so its numbers differ from the "
                      "subsampled ones", UserWarning, stacklevel=4)


class LFQ(Adapter):
    name = "vector-quantize-pytorch LFQ"
    module = _MODULE
    class_name = "LFQ"
    install_hint = INSTALL_HINT

    def uncovered(self, m):
        options = (
            ("straight_through_activation", not isinstance(m.activation, nn.Identity)),
            ("orthogonal_rotation", m.orthogonal_rotation),
        )
        return next((name for name, active in options if active), None)

    def forward(self, m, x, inv_temperature=100., return_loss_breakdown=False, mask=None):
        lib = sys.modules[type(m).__module__]
        if not m.force_quantization_f32 and x.dtype != torch.float32:
            raise Uncovered("force_quantization_f32=False with 16-bit inputs")
        if m.training and m.frac_per_sample_entropy < 1.0:
            _warn_frac()
        transpose = m.channel_first if m.channel_first is not None else x.ndim >= 4
        spatial = None
        if transpose:  # (b, d, ...) -> (b, n, d), as the library's rearrange + pack
            spatial = x.shape[2:]
            x = x.movedim(1, -1).reshape(x.shape[0], -1, x.shape[1])
        assert x.shape[-1] == m.dim, f"expected dimension of {m.dim} but received {x.shape[-1]}"
        x = m.project_in(x)
        if m.soft_clamp_input_value is not None:
            v = m.soft_clamp_input_value
            x = (x / v).tanh() * v
        orig_dtype = x.dtype
        xf = x.float() if m.force_quantization_f32 else x
        k, groups, s = m.codebook_dim, m.num_codebooks, m.codebook_scale
        opts = dict(inv_temperature=float(inv_temperature), diversity_gamma=float(m.diversity_gamma),
                    codebook_scale=float(s), spherical=bool(m.spherical), num_codebooks=groups, entropy="clamped")
        zero = m.zero
        if m.training and mask is None:
            r = lookup_free_quantize(xf, **opts)
            quantized, indices = r.quantized, r.indices
            ps, cbe, entropy_aux_loss, commit_full = r.per_sample_entropy, r.codebook_entropy, r.entropy_loss, \
                r.commitment_loss
        else:  # eval, or a mask: quantize every token here (elementwise), losses over the masked tokens only
            xg = xf.unflatten(-1, (groups, k))
            xn = F.normalize(xg, dim=-1) * s if m.spherical else xg
            positive = xn > 0
            sigma = s / k ** 0.5 if m.spherical else s
            q = positive.to(xn.dtype) * (2.0 * sigma) - sigma
            indices = (positive.long() << torch.arange(k - 1, -1, -1, device=x.device)).sum(-1)
            quantized = (xn + (q - xn).detach() if m.training else q).flatten(-2)
            ps = cbe = entropy_aux_loss = commit_full = zero
            if m.training:
                r = lookup_free_quantize(xf[mask], **opts)
                # the library's "batch" entropy with a mask is the per-sample one: its avg_prob reduces
                # '... c d -> c d' over a 2-D (tokens * codebooks, codes) tensor, which averages nothing
                ps, commit_full = r.per_sample_entropy, r.commitment_loss
                cbe = ps
                entropy_aux_loss = ps - m.diversity_gamma * cbe
        if m.training and m.experimental_softplus_entropy_loss:
            entropy_aux_loss = F.softplus(entropy_aux_loss + m.entropy_loss_offset)
        commit_loss = commit_full if m.training and m.commitment_loss_weight > 0. else zero
        x = quantized.type(orig_dtype) if m.force_quantization_f32 else quantized
        x = m.project_out(x)
        if transpose:
            x = x.unflatten(1, spatial).movedim(-1, 1)
            indices = indices.unflatten(1, spatial)
        if not m.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        aux_loss = entropy_aux_loss * m.entropy_loss_weight + commit_loss * m.commitment_loss_weight
        ret = lib.Return(x, indices, aux_loss)
        if not return_loss_breakdown:
            return ret
        return ret, lib.LossBreakdown(ps, cbe, commit_loss)


ADAPTERS = (LFQ(),)
