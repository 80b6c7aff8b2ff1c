"""Nearest-codebook search and the VQ forward/backward in plain PyTorch, blocked over rows.

The N x K distance matrix never exists: rows are processed in blocks of about 4M distances, so extra
memory is O(block * K + N + K) besides the (N, D) row copies.
"""
from __future__ import annotations

import torch

from .gaussian import acc_dtype

_BLOCK_ELEMENTS = 1 << 22  # distances per block


def rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with axis `dim` moved last and the others flattened: (N, D) rows (a view when possible)."""
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def unrows(r: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `rows`: (N, D) back to `like`'s shape (contiguous)."""
    return r.reshape(like.movedim(dim, -1).shape).movedim(-1, dim).contiguous()


def _blocks(n: int, k: int):
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _search(zr: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """argmin_k ||e_k||^2 - 2 z.e_k per row (lowest index on ties, -1 where a distance is NaN)."""
    acc = acc_dtype(torch.promote_types(zr.dtype, cb.dtype))
    cbf = cb.to(acc)
    norms = (cbf * cbf).sum(1)
    out = torch.empty(zr.shape[0], dtype=torch.int64, device=zr.device)
    for blk in _blocks(zr.shape[0], cb.shape[0]):
        d = torch.addmm(norms, zr[blk].to(acc), cbf.t(), alpha=-2.0)
        idx = d.argmin(1)  # argmin picks a NaN when the row has one, so checking the picked value suffices
        out[blk] = idx.masked_fill_(d.gather(1, idx.unsqueeze(1)).squeeze(1).isnan(), -1)
    return out


def _gather(cb: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Codes for each index, NaN rows for -1."""
    e = cb.to(dtype)[idx.clamp_min(0)]
    return e.masked_fill_((idx < 0).unsqueeze(1), float("nan"))


def scatter_rows(idx: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) sums of `values` rows by index; index_put_ with accumulate is deterministic in PyTorch's deterministic mode."""
    out = values.new_zeros((k, values.shape[1]))
    return out.index_put_((idx,), values, accumulate=True)


def nearest_code(z, codebook, dim, precision):
    return _search(rows(z, dim), codebook).view(z.movedim(dim, -1).shape[:-1])


def vq_forward(z, codebook, dim, precision, with_sums):
    acc = acc_dtype(torch.promote_types(z.dtype, codebook.dtype))
    zr = rows(z, dim)
    idx = _search(zr, codebook)
    e = _gather(codebook, idx, acc)
    sq_err = ((e - zr.to(acc)) ** 2).sum()
    valid = idx >= 0
    counts = torch.bincount(idx[valid], minlength=codebook.shape[0])
    sums = None
    if with_sums:
        sums = scatter_rows(idx[valid], zr[valid].to(acc), codebook.shape[0])
    quantized = unrows(e.to(z.dtype), z, dim)
    return quantized, idx.view(z.movedim(dim, -1).shape[:-1]), sq_err, counts, sums


def rotation_grad(dq: torch.Tensor, z: torch.Tensor, e: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rotation-trick gradient per row: lam * (dq - 2 (dq.w) w + 2 (dq.q) u), with vector-quantize-pytorch's safe division.

    u = z / |z|, q = e / |e|, w = (u + q) / |u + q|, lam = |e| / |z|, every division's denominator clamped to eps.
    """
    nz = z.norm(dim=1, keepdim=True).clamp_min(eps)
    ne = e.norm(dim=1, keepdim=True)
    u, q = z / nz, e / ne.clamp_min(eps)
    w = u + q
    w = w / w.norm(dim=1, keepdim=True).clamp_min(eps)
    lam = ne / nz
    return lam * (dq - 2 * (dq * w).sum(1, keepdim=True) * w + 2 * (dq * q).sum(1, keepdim=True) * u)


def vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator):
    acc = acc_dtype(torch.promote_types(z.dtype, codebook.dtype))
    zr = rows(z, dim).to(acc)
    idx = indices.reshape(-1)
    e = _gather(codebook, idx, acc)
    scale = 2.0 / z.numel() if z.numel() else 0.0
    dz = torch.zeros_like(zr)
    if dq is not None:
        dqr = rows(dq, dim).to(acc)
        dz = rotation_grad(dqr, zr, e) if estimator == "rotation" else dqr
    if d_commit is not None:
        dz = dz + (scale * d_commit.to(acc)) * (zr - e)
    dcb = None
    if d_codebook is not None:
        valid = idx >= 0
        diff = (scale * d_codebook.to(acc)) * (e[valid] - zr[valid])
        dcb = scatter_rows(idx[valid], diff, codebook.shape[0]).to(codebook.dtype)
    return unrows(dz.to(z.dtype), z, dim), dcb
