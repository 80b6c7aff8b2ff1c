"""vector-quantize-pytorch's VectorQuantize (and so ResidualVQ, whose layers are VectorQuantize modules), and its
SimVQ (and so ResidualSimVQ).

Covered: euclidean and cosine codebooks, EMA updates (decay, Laplace smoothing, dead-code expiry, manual EMA)
or learnable codebooks, the rotation trick (the default for dim > 1) or the straight-through estimator,
commitment weight, projections, heads (shared or separate codebooks), channel_last both ways, image and 3-D
feature maps, single tokens, freeze_codebook, return_loss_breakdown, and kmeans_init (vk.kmeans from the
library's own initial sample, so the same random state gives the same codebook). The search, gather, losses
and rotation gradient run in the fused op, and its per-code counts and sums replace the N x K one-hot EMA
statistics; the K x D EMA arithmetic afterwards is the library's own (ema_inplace, update_ema, expire_codes_).
"""
from __future__ import annotations

import sys
from functools import partial

import torch

from .._kmeans import lloyd
from ..ops.vq import nearest_code, quantize_with_stats, vector_quantize
from ._base import Adapter, Uncovered
from .vector_quantize_pytorch_lfq import INSTALL_HINT, LFQ

_MODULE = "vector_quantize_pytorch.vector_quantize_pytorch"


def _stack(ts: list) -> torch.Tensor:
    return ts[0].unsqueeze(0) if len(ts) == 1 else torch.stack(ts)


@torch.no_grad()
def _init_embed(cb, flat, lib) -> None:
    """Codebook.init_embed_ with vk.kmeans in place of the library's N x K kmeans: the same initial samples (one
    randperm or randint per codebook, in order, from the global generator), then the library's own buffer
    arithmetic (embed_avg = means * bins, cluster_size = bins, update_ema). Under DDP with sync_kmeans, rank 0's
    sample is broadcast instead of the library's multinomial split of the sample over ranks."""
    if flat.shape[-2] < cb.codebook_size:
        lib.logger.warning(f"k-means init received {flat.shape[-2]} vectors for a codebook of {cb.codebook_size} "
                           "- duplicates will be sampled")
    sync = cb.kmeans_all_reduce_fn is not lib.noop
    distance = "cosine" if cb.use_cosine_sim else "l2"
    means, bins = zip(*(lloyd(f, cb.codebook_size, iters=cb.kmeans_iters, distance=distance, sync=sync)
                        for f in flat))
    means, bins = torch.stack(means).to(flat.dtype), torch.stack(bins)
    cb.embed_avg.data.copy_(means * bins.unsqueeze(-1))
    cb.cluster_size.data.copy_(bins)
    cb.update_ema()
    cb.initted.data.copy_(torch.tensor(True))


class VectorQuantize(Adapter):
    name = "vector-quantize-pytorch VectorQuantize"
    module = _MODULE
    class_name = "VectorQuantize"
    install_hint = INSTALL_HINT

    def uncovered(self, vq):
        cb = vq._codebook
        lib = sys.modules[type(cb).__module__]
        sampler = cb.gumbel_sample
        standard = isinstance(sampler, partial) and sampler.func is lib.gumbel_sample
        options = (
            ("stochastic_sample_codes", standard and sampler.keywords.get("stochastic", False)),
            ("straight_through (gumbel)", standard and sampler.keywords.get("straight_through", False)),
            ("a custom gumbel_sample", not standard),
            ("directional_reparam", vq.directional_reparam),
            ("orthogonal_reg_weight > 0", vq.has_codebook_orthogonal_loss),
            ("codebook_diversity_loss_weight > 0", vq.has_codebook_diversity_loss),
            ("commitment_use_cross_entropy_loss", vq.commitment_use_cross_entropy_loss),
            ("affine_param", cb.affine_param),
            ("vq_bridge", cb.vq_bridge is not None),
            ("in_place_codebook_optimizer", vq.in_place_codebook_optimizer is not None),
            ("sync_update_v > 0", vq.sync_update_v > 0),
        )
        return next((name for name, active in options if active), None)

    def forward(self, vq, x, indices=None, mask=None, lens=None, topk=None, sample_codebook_temp=None,
                freeze_codebook=None, return_loss_breakdown=False, codebook_transform_fn=None,
                ema_update_weight=None, accum_ema_update=False, ema_update=None):
        for option, value in (("indices (cross-entropy loss)", indices), ("mask", mask), ("lens", lens),
                              ("topk (beam search)", topk), ("codebook_transform_fn", codebook_transform_fn),
                              ("ema_update_weight", ema_update_weight)):
            if value is not None:
                raise Uncovered(option)
        if accum_ema_update:
            raise Uncovered("accum_ema_update")
        cb = vq._codebook
        lib = sys.modules[type(cb).__module__]
        freeze = vq.freeze_codebook if freeze_codebook is None else freeze_codebook
        ema_update = cb.ema_update if ema_update is None else ema_update

        # the library's input layout handling, in plain reshapes
        input_requires_grad = x.requires_grad
        only_one = x.ndim == 2
        if only_one:
            x = x.unsqueeze(1)
        dtype, batch = x.dtype, x.shape[0]
        need_transpose = not (vq.channel_last or vq.accept_image_fmap or vq.accept_3d_fmap or only_one)
        fmap = vq.accept_image_fmap or vq.accept_3d_fmap
        spatial = x.shape[2:] if fmap else None
        if fmap:
            x = x.flatten(2).transpose(1, 2)
        if need_transpose:
            x = x.transpose(1, 2)
        x = vq.project_in(x)
        x = vq.maybe_split_heads_from_input(x)
        x = cb.transform_input(x)

        # the codebook: search, gather, losses and estimator in the fused op, one call per codebook
        xf = x.float()
        squeeze = xf.ndim < 4
        if squeeze:
            xf = xf.unsqueeze(0)
        flat = xf.reshape(xf.shape[0], -1, xf.shape[-1])
        if not cb.initted:  # kmeans_init: on the first call, in any mode, as Codebook.forward does
            _init_embed(cb, flat, lib)
        embed = (cb.embed if cb.learnable_codebook else cb.embed.detach()).to(xf.dtype)
        update = vq.training and not freeze and (ema_update or cb.has_dead_code_replacement)
        estimator = "rotation" if vq.rotation_trick else "ste"
        routed = vq.training and input_requires_grad and vq.route_gradients_to_input
        learn_from_commit = vq.learnable_codebook and not freeze
        codes, inds, commits, counts, sums = [], [], [], [], []
        for i in range(flat.shape[0]):
            if not vq.training:
                idx = nearest_code(flat[i], embed[i])
                codes.append(embed[i][idx])
                inds.append(idx)
                continue
            book = embed[i] if learn_from_commit else embed[i].detach()  # no zero gradient where none flows
            if update:
                book = book.clone()  # update_ema and expiry rewrite embed in place; backward needs these codes
            r, n_i, s_i, _ = quantize_with_stats(flat[i], book, estimator=estimator, with_sums=update)
            codes.append(r.quantized if routed else embed[i][r.indices])
            inds.append(r.indices)
            commit = r.commitment_loss
            if learn_from_commit:  # mse(quantize, x) with the codebook not detached: both gradients
                commit = commit + (r.codebook_loss - r.codebook_loss.detach())
            commits.append(commit)
            counts.append(n_i)
            sums.append(s_i)
        quantize = _stack(codes).reshape(xf.shape).type(dtype)
        embed_ind = _stack(inds).reshape(xf.shape[:-1])
        if squeeze:
            quantize, embed_ind = quantize[0], embed_ind[0]

        if update:
            with torch.no_grad():
                cluster_size = _stack(counts).to(flat.dtype)
                embed_sum = _stack(sums).to(flat.dtype)
                cb.all_reduce_fn(cluster_size)
                cb.all_reduce_fn(embed_sum)
                lib.ema_inplace(cb.cluster_size, cluster_size, cb.decay)
                lib.ema_inplace(cb.embed_avg, embed_sum, cb.decay)
                if ema_update and not cb.manual_ema_update:
                    cb.update_ema()
                cb.expire_codes_(flat)

        loss = commit_loss = vq.zero
        if vq.training:
            loss.requires_grad_()  # as the library does
            if vq.has_commitment_loss:
                commit_loss = (commits[0] if len(commits) == 1 else sum(commits) / len(commits)).to(dtype)
                loss = loss + commit_loss * vq.commitment_weight

        # back to the caller's layout
        heads = vq.heads
        if heads > 1:
            if vq.separate_codebook_per_head:  # (h, b, n[, d])
                embed_ind = embed_ind.permute(1, 2, 0)
                quantize = quantize.permute(1, 2, 0, 3)
            else:  # (1, b*h, n[, d])
                embed_ind = embed_ind[0].unflatten(0, (batch, heads)).permute(0, 2, 1)
                quantize = quantize[0].unflatten(0, (batch, heads)).permute(0, 2, 1, 3)
            quantize = quantize.flatten(2)
        quantize = vq.project_out(quantize)
        if fmap:
            embed_ind = embed_ind.unflatten(1, spatial)
            quantize = quantize.transpose(1, 2).unflatten(2, spatial)
        if need_transpose:
            quantize = quantize.transpose(1, 2)
        if only_one:
            embed_ind, quantize = embed_ind[:, 0], quantize[:, 0]
        if not return_loss_breakdown:
            return quantize, embed_ind, loss
        return quantize, embed_ind, loss, lib.LossBreakdown(commit_loss, vq.zero, vq.zero, vq.zero)


class SimVQ(Adapter):
    """SimVQ (Zhu et al. 2024): every code is code_transform(frozen_codebook), so one linear layer trains them all.
    Its forward is vector_quantize on that implicit codebook with beta = input_to_quantize_commit_loss_weight and
    the rotation trick (or, with rotation_trick=False, the straight-through estimator), times commitment_weight:
    the search, gather, losses and estimator run fused; the gradient reaches the transform through the codebook.
    Covered: channel_first both ways, any leading shape, frozen_codebook_dim, custom codebook transforms."""
    name = "vector-quantize-pytorch SimVQ"
    module = "vector_quantize_pytorch.sim_vq"
    class_name = "SimVQ"
    install_hint = INSTALL_HINT

    def forward(self, sim, x):
        if sim.channel_first:
            x = x.movedim(1, -1)
        shape = x.shape
        r = vector_quantize(x.reshape(shape[0], -1, shape[-1]), sim.codebook,
                            beta=sim.input_to_quantize_commit_loss_weight,
                            estimator="rotation" if sim.rotation_trick else "ste")
        quantized = r.quantized.reshape(shape)
        if sim.channel_first:
            quantized = quantized.movedim(-1, 1)
        return quantized, r.indices.reshape(shape[:-1]), r.loss * sim.commitment_weight


ADAPTERS = (VectorQuantize(), LFQ(), SimVQ())
