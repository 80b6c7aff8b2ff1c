"""The EnCodec lineage's quantizer (core_vq.py in encodec, audiocraft and speechtokenizer, and the many
repositories that copy that file): EuclideanCodebook and VectorQuantization, the level of ResidualVectorQuantization.

The residual loops stay the packages' own code (audiocraft's detached levels, final straight-through and
[B, K, T] codes, speechtokenizer's forward(x, n_q, layers) with its per-level outputs), and so do projections.
- init_embed_: vk.kmeans on the first batch from the same initial sample (one randperm, or randint when N < K,
  from the global generator); embed = embed_avg = means, cluster_size = the counts of the last iteration,
  inited set, then the buffer broadcast where the package's own init_embed_ makes one.
- forward: one fused search with per-code counts and sums in place of the N x K distances, the one-hot and its
  matmul; codes are gathered from the codebook before this step's update. Then, as the original: the package's
  own expire_codes_ (previous cluster_size, its random draw and broadcast), EMA of cluster_size and embed_avg,
  Laplace smoothing, embed = embed_avg / smoothed sizes. The straight-through output and the commitment loss
  are formed from the gathered codes e; the loss is mean((x - e)^2), which keeps only x - e for backward where
  the original's mse_loss keeps x and the codes (the residual loop holds every level's for backward).
- quantize (encode): the fused search.
"""
from __future__ import annotations

import inspect
import sys

import torch
import torch.distributed as dist

from .._kmeans import lloyd
from ..ops.vq import nearest_code, quantize_with_stats
from ._base import Adapter

_ATTRIBUTES = ("embed", "embed_avg", "cluster_size", "inited", "codebook_size", "kmeans_iters", "decay", "epsilon",
               "threshold_ema_dead_code")


def _broadcast_buffers(adapter: Adapter, cb) -> None:
    """Rank 0's buffers on every rank, where the package's init_embed_ broadcasts (speechtokenizer's does not)."""
    original = inspect.unwrap(vars(adapter.owner(type(cb)))["init_embed_"])
    if "broadcast_tensors" not in original.__code__.co_names:
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in cb.buffers():
            if t.is_floating_point() or t.is_complex():
                dist.broadcast(t.data, src=0)


class EuclideanCodebook(Adapter):
    class_name = "EuclideanCodebook"
    methods = ("init_embed_", "quantize", "forward")
    attributes = _ATTRIBUTES

    def __init__(self, library: str, module: str, install_hint: str):
        self.library, self.module, self.install_hint = library, module, install_hint
        self.name = "core_vq EuclideanCodebook"

    def is_target(self, klass):
        """Any class named EuclideanCodebook defining these methods and expire_codes_: the file is widely copied."""
        return klass.__name__ == self.class_name and all(m in vars(klass) for m in (*self.methods, "expire_codes_"))

    @torch.no_grad()
    def init_embed_(self, cb, data):
        if cb.inited:
            return
        means, bins = lloyd(data, cb.codebook_size, iters=cb.kmeans_iters, sync=False)
        means = means.to(cb.embed.dtype)
        cb.embed.data.copy_(means)
        cb.embed_avg.data.copy_(means)
        cb.cluster_size.data.copy_(bins)
        cb.inited.data.copy_(torch.Tensor([True]))
        _broadcast_buffers(self, cb)

    def quantize(self, cb, x):
        return nearest_code(x, cb.embed)

    def forward(self, cb, x):
        shape = x.shape
        r = quantize_and_update(cb, x.reshape(-1, shape[-1]).detach(), dim=-1)
        return r.quantized.reshape(shape), r.indices.reshape(shape[:-1])


def quantize_and_update(cb, x, dim: int):
    """EuclideanCodebook.forward's work on x with channels along `dim`, as a VQResult in x's layout: k-means init
    on the first call, the fused search on the codebook before this step, then in training the package's dead-code
    expiry and the EMA update. The straight-through output and commitment loss carry gradients when x has one."""
    lib = sys.modules[type(cb).__module__]
    samples = x.detach().movedim(dim, -1)  # a view; copied only for the init and where a code expires
    if not cb.inited:
        cb.init_embed_(samples.reshape(-1, samples.shape[-1]))
    r, counts, sums, _ = quantize_with_stats(x.detach(), cb.embed, dim=dim, with_sums=cb.training)
    if x.requires_grad and cb.training:  # straight-through, and a loss that keeps only x - e for backward
        e = r.quantized  # (mse_loss would keep both x and e: one more D-wide tensor per level of the residual loop)
        r = r._replace(quantized=x + (e - x).detach(), commitment_loss=(x - e).square().mean())
    if cb.training:
        with torch.no_grad():
            cb.expire_codes_(samples)
            lib.ema_inplace(cb.cluster_size, counts.to(x.dtype), cb.decay)
            lib.ema_inplace(cb.embed_avg, sums.to(x.dtype), cb.decay)
            n = cb.cluster_size.sum()
            cluster_size = lib.laplace_smoothing(cb.cluster_size, cb.codebook_size, cb.epsilon) * n
            cb.embed.data.copy_(cb.embed_avg / cluster_size.unsqueeze(1))
    return r


class VectorQuantization(Adapter):
    class_name = "VectorQuantization"
    attributes = ("_codebook", "project_in", "project_out", "commitment_weight")

    def __init__(self, codebook: EuclideanCodebook):
        self.codebook = codebook
        self.library, self.module, self.install_hint = codebook.library, codebook.module, codebook.install_hint
        self.name = "core_vq VectorQuantization"

    def is_target(self, klass):
        """Any class named VectorQuantization defining forward, encode and decode (copies of core_vq.py)."""
        return klass.__name__ == self.class_name and all(m in vars(klass) for m in ("forward", "encode", "decode"))

    def uncovered(self, vq):
        if not self.codebook.matches(vq._codebook):
            return f"a {type(vq._codebook).__name__} codebook"
        if getattr(vq, "orthogonal_reg_weight", 0) > 0:
            return "orthogonal_reg_weight > 0 (its codebook still runs the fused search and EMA)"
        return None

    def forward(self, vq, x):
        channels_last = getattr(vq, "channels_last", False)
        if not channels_last:
            x = x.transpose(1, 2)
        z = vq.project_in(x)
        r = quantize_and_update(vq._codebook, z if vq.training else z.detach(), -1)
        loss = torch.tensor([0.0], device=x.device, requires_grad=vq.training)
        if vq.training and vq.commitment_weight > 0:
            loss = loss + r.commitment_loss * vq.commitment_weight
        quantize = vq.project_out(r.quantized)
        if not channels_last:
            quantize = quantize.transpose(1, 2)
        return quantize, r.indices, loss


_HINT = "{} (pip install --no-deps {}; see docs/patching.md)"
_CODEBOOKS = tuple(EuclideanCodebook(library, f"{library}.quantization.core_vq", _HINT.format(library, library))
                   for library in ("encodec", "audiocraft", "speechtokenizer"))
ADAPTERS = (*_CODEBOOKS, *(VectorQuantization(cb) for cb in _CODEBOOKS))
