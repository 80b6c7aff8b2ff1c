"""Nearest-codebook search and the VQ forward/backward in plain PyTorch, blocked over rows.

The N x K distance matrix never exists: rows are processed in blocks of about 1M distances, so extra
memory is O(block * K + N + K) besides the (N, D) row copies.
"""
from __future__ import annotations

import torch

from .gaussian import acc_dtype

# distances per block: 4 MiB in float32, which stays in a CPU's last-level cache between the GEMM that writes it and
# the argmin that reads it (faster than 16 MiB blocks at a few dims per code, the same at 64 and more, on a 2-core
# EPYC with 8 MiB of L3; smaller blocks slow the GEMM down at wide rows)
_BLOCK_ELEMENTS = 1 << 20


def rows(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t with axis `dim` moved last and the others flattened: (N, D) rows (a view when possible)."""
    if dim == t.dim() - 1:
        return t.reshape(-1, t.shape[dim])
    return t.movedim(dim, -1).reshape(-1, t.shape[dim])


def unrows(r: torch.Tensor, like: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of `rows`: (N, D) back to `like`'s shape (contiguous)."""
    if dim == like.dim() - 1:
        return r.view(like.shape)
    return r.reshape(like.movedim(dim, -1).shape).movedim(-1, dim).contiguous()


def _f(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _blocks(n: int, k: int):
    step = max(1, _BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _search_block(zr: torch.Tensor, cbf: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.addmm(norms, _f(zr, cbf.dtype), cbf.t(), alpha=-2.0)
    idx = d.argmin(1, keepdim=True)  # argmin picks a NaN when the row has one, so checking the picked value suffices
    # (argmin, not min(dim): on a busy 2-core machine min's parallel reduction stalls for milliseconds on tiny rows)
    return idx, d.gather(1, idx).isnan()


def _search(zr: torch.Tensor, cb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(idx, nan, cbf): argmin_k ||e_k||^2 - 2 z.e_k per row as (N, 1) indices (lowest on ties), whether the picked
    distance is NaN (N, 1), and the codebook in the accumulation dtype the distances were computed in."""
    cbf = _f(cb, acc_dtype(torch.promote_types(zr.dtype, cb.dtype)))
    norms = torch.linalg.vecdot(cbf, cbf)
    if zr.shape[0] * cb.shape[0] <= _BLOCK_ELEMENTS:
        return *_search_block(zr, cbf, norms), cbf
    idx = torch.empty((zr.shape[0], 1), dtype=torch.int64, device=zr.device)
    nan = torch.empty((zr.shape[0], 1), dtype=torch.bool, device=zr.device)
    for blk in _blocks(zr.shape[0], cb.shape[0]):
        idx[blk], nan[blk] = _search_block(zr[blk], cbf, norms)
    return idx, nan, cbf


def _no_nan_rows(nan: torch.Tensor) -> bool:
    """True when no row's distances were NaN (`nan`: the search's per-row flags), where the host can read that
    without a device synchronisation (CPU tensors): such a batch skips the -1 masking and the extra slot.
    False elsewhere: mask anyway."""
    return nan.is_cpu and not nan.any()


def _no_nan_indices(idx: torch.Tensor) -> bool:
    """True when no index is -1 (a NaN row), where the host can read that without a synchronisation (CPU)."""
    return idx.is_cpu and int(idx.min()) >= 0


def _slots(idx: torch.Tensor, k: int) -> torch.Tensor:
    """Indices as slots of k + 1 per-code accumulators: index -1 (a NaN row) becomes k (-1 mod k + 1), the extra
    slot that is dropped."""
    return idx.remainder(k + 1)


def gather_codes(cb: torch.Tensor, idx: torch.Tensor, dtype: torch.dtype, no_nan: bool) -> torch.Tensor:
    """The code of each index of 1-D idx as rows, NaN rows for -1 (there are none when `no_nan`)."""
    if no_nan:
        return _f(cb, dtype).index_select(0, idx)
    return _f(cb, dtype)[idx].masked_fill_((idx < 0).unsqueeze(1), float("nan"))


def scatter_rows(idx: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """(k, D) sums of `values` rows by index; index_put_ with accumulate is deterministic in PyTorch's deterministic mode."""
    out = values.new_zeros((k, values.shape[1]))
    return out.index_put_((idx,), values, accumulate=True)


def index_shape(z: torch.Tensor, dim: int) -> tuple:
    """The shape of z's indices: z's shape without axis `dim` (non-negative, as the ops pass it)."""
    return tuple(z.shape[:dim] + z.shape[dim + 1:])


def nearest_code(z, codebook, dim, precision):
    idx, nan, _ = _search(rows(z, dim), codebook)
    return idx.masked_fill_(nan, -1).view(index_shape(z, dim))


def vq_forward(z, codebook, dim, precision, with_sums):
    zr = rows(z, dim)
    idx, nan, cbf = _search(zr, codebook)
    e = cbf.index_select(0, idx.view(-1))
    zf = _f(zr, cbf.dtype)
    k = codebook.shape[0]
    if _no_nan_rows(nan):
        slot, slots = idx.view(-1), k
    else:  # NaN rows: NaN codes, index -1, counted in an extra slot that is dropped
        e.masked_fill_(nan, float("nan"))
        idx.masked_fill_(nan, -1)
        slot, slots = _slots(idx, k).view(-1), k + 1
    sq_err = torch.sub(e, zf).square_().sum()
    counts = torch.bincount(slot, minlength=slots)
    sums = scatter_rows(slot, zf, slots) if with_sums else None
    if slots > k:
        counts, sums = counts[:k], (None if sums is None else sums[:k])
    quantized = unrows(_f(e, z.dtype), z, dim)
    return quantized, idx.view(index_shape(z, dim)), sq_err, counts, sums


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
    zr = _f(rows(z, dim), acc)
    idx = indices.reshape(-1)
    no_nan = _no_nan_indices(idx)
    e = gather_codes(codebook, idx, acc, no_nan)
    scale = 2.0 / z.numel() if z.numel() else 0.0
    dz = None
    if dq is not None:
        dqr = _f(rows(dq, dim), acc)
        dz = rotation_grad(dqr, zr, e) if estimator == "rotation" else dqr
    e_minus_z = torch.sub(e, zr) if d_commit is not None or d_codebook is not None else None
    if d_commit is not None:  # dz += scale * d_commit * (z - e)
        d_commit = _f(d_commit, acc)
        dz = (torch.mul(e_minus_z, d_commit * -scale) if dz is None
              else torch.addcmul(dz, e_minus_z, d_commit, value=-scale))
    if dz is None:
        dz = torch.zeros_like(zr)
    dcb = None
    if d_codebook is not None:  # scale * d_codebook * (e - z), summed by code
        k = codebook.shape[0]
        diff = e_minus_z.mul_(_f(d_codebook, acc) * scale)
        sums = scatter_rows(idx, diff, k) if no_nan else scatter_rows(_slots(idx, k), diff, k + 1)[:k]
        dcb = _f(sums, codebook.dtype)
    return unrows(_f(dz, z.dtype), z, dim), dcb
