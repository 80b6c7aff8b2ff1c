"""Triton kernels for nearest-codebook search, the VQ epilogue and the VQ backward.

Search: each program owns BLOCK_N rows and sweeps the codebook in BLOCK_K tiles, keeping a running argmin of
||e||^2 - 2 z.e (code norms computed once per call); the N x K distances never leave registers. In the same
launch the epilogue gathers the chosen codes into `quantized` (in z's own layout), writes a partial sum of
squared errors, and accumulates per-code counts (integer atomics) and, for EMA, per-code sums of z.
Fast precisions ("tf32", "bf16") run the dot products on tensor cores, keep the best two candidates per row
and re-score them in float32. In PyTorch's deterministic mode, per-code float sums are taken by sorting rows by
code and summing each code's rows in order, instead of float atomics.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from .._backend import triton_interpreted
from ..reference import vq as reference
from . import _common
from ._common import _wide, reduce_rows, row_layout

_PRECISION = {"exact": 0, "tf32": 1, "bf16": 2}
_EPS = 1e-6  # vector-quantize-pytorch's safe-division epsilon for the rotation trick


# (BLOCK_N, BLOCK_K, warps, stages) the GPU autotuner tries, per K and D bucket
SEARCH_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                  for bn, bk, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                                       (128, 32, 4, 4), (32, 128, 4, 4)]]


def _search_configs():
    """The interpreter takes one small tile; VAEKERNELS_AUTOTUNE=0 takes the first config without tuning (the
    GPU test suite sets it: every tuning compiles each config, and the tests only need a correct one)."""
    if triton_interpreted():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return SEARCH_CONFIGS if os.environ.get("VAEKERNELS_AUTOTUNE", "1") != "0" else SEARCH_CONFIGS[:1]


@triton.jit
def _dist_tile(z_tile, z_ptr, row_base, row_ok, cb_ptr, ks, k_ok, D, M, WIDE: tl.constexpr,
               ONE_D_TILE: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """z.e for BLOCK_N rows x BLOCK_K codes, float32 accumulation, looping over D when it spans several tiles."""
    dot = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    d_lanes = tl.arange(0, BLOCK_D)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + d_lanes
        d_ok = ds < D
        if ONE_D_TILE:
            zt = z_tile
        else:
            zt = tl.load(z_ptr + row_base[:, None] + _wide(ds[None, :], WIDE) * M,
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        et = tl.load(cb_ptr + _wide(ks[None, :], WIDE) * D + ds[:, None], mask=k_ok[None, :] & d_ok[:, None],
                     other=0.0).to(tl.float32)
        if PRECISION == 2:
            dot = tl.dot(zt.to(tl.bfloat16), et.to(tl.bfloat16), dot)
        elif PRECISION == 1:
            dot = tl.dot(zt, et, dot, input_precision="tf32")
        else:
            dot = tl.dot(zt, et, dot, input_precision="ieee")
    return dot


@triton.jit
def _exact_dist(z_ptr, row_base, row_ok, cb_ptr, norms_ptr, code, D, M,
                WIDE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """float32 ||e||^2 - 2 z.e between each row and one code per row (the re-scoring of fast precisions)."""
    dot = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ds[None, :] < D)
        zt = tl.load(z_ptr + row_base[:, None] + _wide(ds[None, :], WIDE) * M, mask=mask, other=0.0).to(tl.float32)
        et = tl.load(cb_ptr + _wide(code[:, None], WIDE) * D + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        dot += tl.sum(zt * et, axis=1)
    return tl.load(norms_ptr + code, mask=row_ok, other=0.0) - 2.0 * dot


@triton.autotune(configs=_search_configs(), key=["k_bucket", "d_bucket"],
                 reset_to_zero=["counts_ptr", "sums_ptr", "sq_ptr"])
@triton.jit
def _search_kernel(z_ptr, cb_ptr, norms_ptr, idx_ptr, q_ptr, sq_ptr, counts_ptr, sums_ptr,
                   N, K, D, M, DM, k_bucket, d_bucket,
                   WIDE: tl.constexpr, PRECISION: tl.constexpr, EPILOGUE: tl.constexpr, WITH_SUMS: tl.constexpr,
                   ONE_D_TILE: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = _wide(pid, WIDE) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = (rows // M) * DM + rows % M  # element d of row n sits at row_base + d * M
    d_lanes = tl.arange(0, BLOCK_D)
    z_tile = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    if ONE_D_TILE:  # small D: the rows stay in registers for the whole sweep
        z_tile = tl.load(z_ptr + row_base[:, None] + _wide(d_lanes[None, :], WIDE) * M,
                         mask=row_ok[:, None] & (d_lanes[None, :] < D), other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    second = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    second_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    has_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
    k_lanes = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + k_lanes
        k_ok = ks < K
        dot = _dist_tile(z_tile, z_ptr, row_base, row_ok, cb_ptr, ks, k_ok, D, M,
                         WIDE, ONE_D_TILE, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        norms = tl.load(norms_ptr + ks, mask=k_ok, other=0.0)
        dist = norms[None, :] - 2.0 * dot
        has_nan = tl.maximum(has_nan, tl.max((dist != dist).to(tl.int32), axis=1))
        dist = tl.where(k_ok[None, :], dist, float("inf"))
        tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True)
        tile_arg = tile_arg + k0
        if PRECISION != 0:  # keep the best two for the float32 re-scoring
            rest = tl.where(ks[None, :] == tile_arg[:, None], float("inf"), dist)
            tile_min2, tile_arg2 = tl.min(rest, axis=1, return_indices=True)
            tile_arg2 = tile_arg2 + k0
            new_best = tile_min < best
            second_idx = tl.where(new_best, tl.where(tile_min2 < best, tile_arg2, best_idx),
                                  tl.where(tile_min < second, tile_arg, second_idx))
            second = tl.where(new_best, tl.minimum(tile_min2, best), tl.minimum(tile_min, second))
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_arg, best_idx)
    if PRECISION != 0:
        d1 = _exact_dist(z_ptr, row_base, row_ok, cb_ptr, norms_ptr, best_idx, D, M, WIDE, BLOCK_N, BLOCK_D)
        d2 = _exact_dist(z_ptr, row_base, row_ok, cb_ptr, norms_ptr, second_idx, D, M, WIDE, BLOCK_N, BLOCK_D)
        swap = (second < float("inf")) & ((d2 < d1) | ((d2 == d1) & (second_idx < best_idx)))
        best_idx = tl.where(swap, second_idx, best_idx)
    nan_row = has_nan > 0
    tl.store(idx_ptr + rows, tl.where(nan_row, -1, best_idx).to(tl.int64), mask=row_ok)
    if EPILOGUE:
        valid = row_ok & (has_nan == 0)
        sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + d_lanes
            mask = row_ok[:, None] & (ds[None, :] < D)
            offs = row_base[:, None] + _wide(ds[None, :], WIDE) * M
            zt = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            et = tl.load(cb_ptr + _wide(best_idx[:, None], WIDE) * D + ds[None, :], mask=mask, other=0.0)
            et = tl.where(nan_row[:, None], float("nan"), et.to(tl.float32))
            tl.store(q_ptr + offs, et.to(q_ptr.dtype.element_ty), mask=mask)
            diff = tl.where(mask, et - zt, 0.0)
            sq += tl.sum(diff * diff, axis=1)
            if WITH_SUMS:
                tl.atomic_add(sums_ptr + _wide(best_idx[:, None], WIDE) * D + ds[None, :], zt,
                              mask=mask & valid[:, None])
        tl.store(sq_ptr + pid, tl.sum(sq, axis=0))
        tl.atomic_add(counts_ptr + best_idx, tl.full((BLOCK_N,), 1, tl.int64), mask=valid)


@triton.jit
def _backward_kernel(dq_ptr, z_ptr, cb_ptr, idx_ptr, dcommit_ptr, dcode_ptr, dz_ptr, dcb_ptr,
                     N, D, M, DM, scale,
                     HAS_DQ: tl.constexpr, HAS_COMMIT: tl.constexpr, ROTATION: tl.constexpr,
                     SCATTER: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """dz = T(dq) + c (z - e) in one pass (T: identity or the rotation trick, O(D) per row);
    with SCATTER, dcodebook += c' (e - z) by code with float atomics."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = (rows // M) * DM + rows % M
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=0)
    valid = row_ok & (idx >= 0)
    code_base = tl.maximum(idx, 0) * D
    d_lanes = tl.arange(0, BLOCK_D)
    c_commit = 0.0
    if HAS_COMMIT:
        c_commit = tl.load(dcommit_ptr).to(tl.float32) * scale
    c_code = 0.0
    if SCATTER:
        c_code = tl.load(dcode_ptr).to(tl.float32) * scale
    lam = tl.zeros((BLOCK_N,), dtype=tl.float32)
    cz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    ce = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if ROTATION:  # per-row dot products, then dz_rot = lam dq + cz z + ce e
        zz = tl.zeros((BLOCK_N,), dtype=tl.float32)
        ee = tl.zeros((BLOCK_N,), dtype=tl.float32)
        ze = tl.zeros((BLOCK_N,), dtype=tl.float32)
        qz = tl.zeros((BLOCK_N,), dtype=tl.float32)
        qe = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            ds = d0 + d_lanes
            mask = row_ok[:, None] & (ds[None, :] < D)
            offs = row_base[:, None] + ds[None, :].to(tl.int64) * M
            zt = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            et = tl.load(cb_ptr + code_base[:, None] + ds[None, :], mask=mask, other=0.0).to(tl.float32)
            gt = tl.load(dq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            zz += tl.sum(zt * zt, axis=1)
            ee += tl.sum(et * et, axis=1)
            ze += tl.sum(zt * et, axis=1)
            qz += tl.sum(gt * zt, axis=1)
            qe += tl.sum(gt * et, axis=1)
        nz = tl.maximum(tl.sqrt(zz), EPS)
        ne = tl.sqrt(ee)
        nq = tl.maximum(ne, EPS)
        ns = tl.maximum(tl.sqrt(zz / (nz * nz) + ee / (nq * nq) + 2.0 * ze / (nz * nq)), EPS)
        lam = ne / nz
        dq_w = (qz / nz + qe / nq) / ns
        cz = 2.0 * lam * (qe / (nq * nz) - dq_w / (ns * nz))
        ce = -2.0 * lam * dq_w / (ns * nq)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + d_lanes
        mask = row_ok[:, None] & (ds[None, :] < D)
        offs = row_base[:, None] + ds[None, :].to(tl.int64) * M
        zt = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        et = tl.load(cb_ptr + code_base[:, None] + ds[None, :], mask=mask, other=0.0).to(tl.float32)
        et = tl.where(valid[:, None], et, float("nan"))
        g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        if HAS_DQ:
            g = tl.load(dq_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if ROTATION:
                g = lam[:, None] * g + cz[:, None] * zt + ce[:, None] * et
        if HAS_COMMIT:
            g += c_commit * (zt - et)
        tl.store(dz_ptr + offs, g.to(dz_ptr.dtype.element_ty), mask=mask)
        if SCATTER:
            tl.atomic_add(dcb_ptr + code_base[:, None] + ds[None, :], c_code * (et - zt), mask=mask & valid[:, None])


@triton.jit
def _segment_kernel(z_ptr, cb_ptr, order_ptr, starts_ptr, counts_ptr, scale_ptr, out_ptr, D, M, DM, scale,
                    CODE_MINUS_Z: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_D: tl.constexpr):
    """Deterministic per-code sums: program (k, d-tile) adds code k's rows (sorted by code) in a fixed order.

    out[k] = sum of z rows, or scale * sum of (e_k - z) rows when CODE_MINUS_Z."""
    k = tl.program_id(0)
    ds = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = ds < D
    start = tl.load(starts_ptr + k)
    count = tl.load(counts_ptr + k)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    code = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if CODE_MINUS_Z:
        code = tl.load(cb_ptr + k.to(tl.int64) * D + ds, mask=d_ok, other=0.0).to(tl.float32)
    for j in range(start, start + count):
        n = tl.load(order_ptr + j)
        zt = tl.load(z_ptr + (n // M) * DM + n % M + ds.to(tl.int64) * M, mask=d_ok, other=0.0).to(tl.float32)
        acc += code - zt if CODE_MINUS_Z else zt
    if HAS_SCALE:
        acc = acc * (tl.load(scale_ptr).to(tl.float32) * scale)
    tl.store(out_ptr + k.to(tl.int64) * D + ds, acc, mask=d_ok)


def _block_d(d: int) -> int:
    """The D tile of the search: all of D up to 32 (the rows then stay in registers for the whole sweep), else
    16-wide tiles looped over D. Wider tiles make ptxas spill (sm_90, cuobjdump: at D = 64 in one tile, 0.4 to
    1.5 KB of stack per thread across the autotuning configs; 16-wide tiles: none on the tensor-core paths)."""
    return max(16, triton.next_power_of_2(d)) if d <= 32 else 16


def _bucket(x: int) -> int:
    """Power-of-two bucket: the autotuner re-tunes per bucket, not per exact size."""
    return triton.next_power_of_2(max(1, x))


def _search(zc, n, d, m, dm, codebook, precision, epilogue, with_sums):
    cb = codebook.contiguous()
    k = cb.shape[0]
    norms = cb.float().pow(2).sum(1)
    idx = torch.empty(n, dtype=torch.int64, device=zc.device)
    # outputs the launch does not write get their own 1-element stand-ins, left unfilled (no fill launch): the
    # autotuner zeroes the reset_to_zero arguments between trials, so they must never alias an input such as the norms
    stand_in = functools.partial(torch.empty, 1, device=zc.device)
    q = torch.empty_like(zc) if epilogue else zc.new_empty(1)
    sq = torch.zeros(triton.cdiv(n, 16), dtype=torch.float32, device=zc.device) if epilogue else stand_in()
    counts = torch.zeros(k, dtype=torch.int64, device=zc.device) if epilogue else stand_in(dtype=torch.int64)
    sums = torch.zeros(cb.shape, dtype=torch.float32, device=zc.device) if with_sums else stand_in()
    block_d = _block_d(d)
    _search_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        zc, cb, norms, idx, q, sq, counts, sums, n, k, d, m, dm, _bucket(k), _bucket(d),
        WIDE=max(zc.numel(), cb.numel()) >= _common.WIDE_OFFSETS, PRECISION=_PRECISION[precision], EPILOGUE=epilogue,
        WITH_SUMS=with_sums, ONE_D_TILE=d <= block_d,
        BLOCK_D=block_d)
    return idx, q, sq, counts, (sums if with_sums else None)


def _segment_sums(zc, d, m, dm, codebook, indices, scale_tensor=None, scale=1.0):
    """Per-code sums of z rows (or scale * sums of e - z with scale_tensor), deterministically by sorting."""
    k = codebook.shape[0]
    order = torch.argsort(indices, stable=True)
    counts = torch.bincount(indices + 1, minlength=k + 1)
    starts = torch.cumsum(counts, 0)[:-1]  # rows with index -1 sort first and are skipped
    out = torch.empty(codebook.shape, dtype=torch.float32, device=zc.device)
    block_d = min(triton.next_power_of_2(d), 256)
    code_minus_z = scale_tensor is not None
    _segment_kernel[(k, triton.cdiv(d, block_d))](
        zc, codebook.contiguous(), order, starts, counts[1:], scale_tensor if code_minus_z else out, out, d, m, dm,
        scale, CODE_MINUS_Z=code_minus_z, HAS_SCALE=code_minus_z, BLOCK_D=block_d)
    return out


def nearest_code(z, codebook, dim, precision):
    if z.dtype == torch.float64 or codebook.dtype == torch.float64:
        return reference.nearest_code(z, codebook, dim, precision)
    zc, n, d, m, dm = row_layout(z, dim)
    idx, *_ = _search(zc, n, d, m, dm, codebook, precision, epilogue=False, with_sums=False)
    return idx.view(reference.index_shape(z, dim))


def vq_forward(z, codebook, dim, precision, with_sums):
    if z.dtype == torch.float64 or codebook.dtype == torch.float64:
        return reference.vq_forward(z, codebook, dim, precision, with_sums)
    zc, n, d, m, dm = row_layout(z, dim)
    deterministic = torch.are_deterministic_algorithms_enabled()
    idx, q, sq, counts, sums = _search(zc, n, d, m, dm, codebook, precision, epilogue=True,
                                       with_sums=with_sums and not deterministic)
    if with_sums and deterministic:
        sums = _segment_sums(zc, d, m, dm, codebook, idx)
    sq_err = reduce_rows(sq.view(-1, 1), 1.0).view(())
    return q, idx.view(reference.index_shape(z, dim)), sq_err, counts, sums


def vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator):
    if z.dtype == torch.float64 or codebook.dtype == torch.float64:
        return reference.vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator)
    zc, n, d, m, dm = row_layout(z, dim)
    cb = codebook.contiguous()
    idx = indices.reshape(-1)
    scale = 2.0 / z.numel()
    scatter = d_codebook is not None and not torch.are_deterministic_algorithms_enabled()
    dz = torch.empty_like(zc)
    dcb = torch.zeros(cb.shape, dtype=torch.float32, device=z.device) if scatter else None
    # 32 x 32 tiles: wider D tiles make ptxas spill (sm_90: 128 wide, up to 288 bytes of stack per thread)
    block_n, block_d = 32, min(triton.next_power_of_2(d), 32)
    _backward_kernel[(triton.cdiv(n, block_n),)](
        dq.contiguous() if dq is not None else zc, zc, cb, idx, d_commit if d_commit is not None else zc,
        d_codebook if scatter else zc, dz, dcb if scatter else zc, n, d, m, dm, scale,
        HAS_DQ=dq is not None, HAS_COMMIT=d_commit is not None, ROTATION=estimator == "rotation" and dq is not None,
        SCATTER=scatter, EPS=_EPS, BLOCK_N=block_n, BLOCK_D=block_d)
    if d_codebook is not None and not scatter:
        dcb = _segment_sums(zc, d, m, dm, cb, idx, scale_tensor=d_codebook, scale=scale)
    return dz, (dcb.to(codebook.dtype) if dcb is not None else None)
