"""k-means (Lloyd's algorithm) for codebook initialisation, on the fused VQ search.

One Lloyd iteration is exactly what the VQ forward computes with statistics: the nearest centre of every row,
per-centre counts and per-centre sums. Running it through `quantize_with_stats` means the N x K distance matrix
never exists (memory O(N*D + K*D) plus the search's blocks) and every backend (torch, triton, cuda) runs it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from . import _checks
from .ops.vq import quantize_with_stats
from .reference.vq import rows as _rows


def _synchronised() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def lloyd(x: Tensor, num_codes: int, *, iters: int = 10, distance: str = "l2", dim: int = -1,
          generator: torch.Generator | None = None, sync: bool | None = None) -> tuple[Tensor, Tensor]:
    """`kmeans` that also returns the counts (num_codes,) int64 of the last assignment, with the centres in the
    accumulation dtype (float32, float64 for float64 x). The modules and patches need the counts for their EMA
    cluster sizes. sync: all-reduce over torch.distributed (None: when it is initialised with several ranks)."""
    _checks.latent(x, "x")
    dim = _checks.channel_dim(dim, x.dim())
    _checks.non_empty("x", x)
    _checks.integer("num_codes", num_codes, minimum=1)
    _checks.integer("iters", iters, minimum=0)
    _checks.choice("distance", distance, _checks.DISTANCES)
    _checks.generator(generator)
    sync = _synchronised() if sync is None else bool(sync)

    with torch.no_grad():
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        r = _rows(x.detach(), dim).to(acc)
        if not bool(torch.isfinite(r).all()):
            raise ValueError("x has NaN or infinite values; k-means needs finite rows")
        if distance == "cosine":
            r = F.normalize(r, dim=-1)
        n = r.shape[0]
        # the initial sample is the first thing drawn (vector-quantize-pytorch's sample_vectors draws the same)
        if n >= num_codes:
            pick = torch.randperm(n, generator=generator, device=r.device)[:num_codes]
        else:
            pick = torch.randint(n, (num_codes,), generator=generator, device=r.device)
        centres = r[pick]
        if sync:
            dist.broadcast(centres, src=0)  # every rank starts from rank 0's sample

        counts = None
        for _ in range(iters):
            _, counts, sums, _ = quantize_with_stats(r, centres, with_sums=True)
            if sync:
                dist.all_reduce(counts)
                dist.all_reduce(sums)
            means = sums / counts.clamp_min(1).unsqueeze(1).to(sums.dtype)
            if distance == "cosine":
                means = F.normalize(means, dim=-1)
            centres = torch.where((counts > 0).unsqueeze(1), means, centres)  # empty clusters keep their centre
        if counts is None:  # iters=0: the counts of assigning to the initial sample
            counts = quantize_with_stats(r, centres)[1]
            if sync:
                dist.all_reduce(counts)
    return centres, counts


def kmeans(x: Tensor, num_codes: int, *, iters: int = 10, distance: str = "l2", dim: int = -1,
           generator: torch.Generator | None = None) -> Tensor:
    """Codebook of `num_codes` centres (num_codes, D) by Lloyd's algorithm on the vectors of x along `dim`.

    Initial centres: rows[randperm(N)[:num_codes]] (rows[randint(N, (num_codes,))] when N < num_codes), drawn
    from `generator` (default: torch's global one) before anything else, so that the same random state gives the
    same result here and in vector-quantize-pytorch. Each iteration assigns every row to its nearest centre (ties:
    lowest index) with the fused search and moves each centre to the mean of its rows; a centre without rows keeps
    its value. distance="cosine": spherical k-means (rows and centres l2-normalised). Accumulates in float32
    (float64 for float64 x) and returns x's dtype. Under torch.distributed, rank 0's sample is broadcast and
    counts and sums are all-reduced: every rank gets Lloyd's algorithm on the union of the ranks' rows.
    """
    return lloyd(x, num_codes, iters=iters, distance=distance, dim=dim, generator=generator)[0].to(x.dtype)
