"""The EnCodec lineage's EuclideanCodebook (core_vq.py in encodec, audiocraft and speechtokenizer, and the many
repositories that copy that file): the codebook under VectorQuantization and ResidualVectorQuantization.

Only the codebook's methods are replaced, so what the packages do around it stays their own code: projections,
the straight-through output and the [1]-shaped commitment loss, audiocraft's channels_last, orthogonal
regulariser, detached residual and [B, K, T] codes, speechtokenizer's forward(x, n_q, layers).
- init_embed_: vk.kmeans on the first training batch from the same initial sample (one randperm, or randint when
  N < K, from the global generator); embed = embed_avg = means, cluster_size = the counts of the last iteration,
  inited set, then the buffer broadcast where the package's own init_embed_ makes one.
- forward: one fused search with per-code counts and sums in place of the N x K distances, the one-hot and its
  matmul; codes are gathered from the codebook before this step's update. Then, as the original: the package's
  own expire_codes_ (previous cluster_size, its random draw and broadcast), EMA of cluster_size and embed_avg,
  Laplace smoothing, embed = embed_avg / smoothed sizes.
- quantize (encode and eval): the fused search.
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
        self.name = f"{library} EuclideanCodebook"

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
        lib = sys.modules[type(cb).__module__]
        x = x.reshape(-1, shape[-1])
        cb.init_embed_(x)
        with torch.no_grad():
            r, counts, sums, _ = quantize_with_stats(x.detach(), cb.embed, with_sums=cb.training)
            if cb.training:
                cb.expire_codes_(x)
                lib.ema_inplace(cb.cluster_size, counts.to(x.dtype), cb.decay)
                lib.ema_inplace(cb.embed_avg, sums.to(x.dtype), cb.decay)
                n = cb.cluster_size.sum()
                cluster_size = lib.laplace_smoothing(cb.cluster_size, cb.codebook_size, cb.epsilon) * n
                cb.embed.data.copy_(cb.embed_avg / cluster_size.unsqueeze(1))
        return r.quantized.reshape(shape), r.indices.reshape(shape[:-1])


_HINT = "{} (pip install --no-deps {}; see docs/patching.md)"
ADAPTERS = (
    EuclideanCodebook("encodec", "encodec.quantization.core_vq", _HINT.format("encodec", "encodec")),
    EuclideanCodebook("audiocraft", "audiocraft.quantization.core_vq", _HINT.format("audiocraft", "audiocraft")),
    EuclideanCodebook("speechtokenizer", "speechtokenizer.quantization.core_vq",
                      _HINT.format("speechtokenizer", "speechtokenizer")),
)
