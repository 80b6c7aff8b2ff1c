"""Triton kernels for nearest-codebook search, the VQ epilogue and the VQ backward.

Search, in four launches that never form the N x K distances in memory:
1. `_code_stats_kernel`: per code, ||e||^2 and the coefficients of the distance error bound below.
2. `_search_kernel`, grid (row blocks x code splits): each program sweeps its rows against one contiguous range of
   the codebook in BLOCK_K tiles (tensor cores for "tf32" and "bf16") and keeps, per row, every code whose distance
   may still be the nearest given the error bound (at most CANDIDATES of them; a row with more is flagged).
   Splitting the code axis gives few-row problems enough programs to fill the GPU (`search_splits`).
3. `_research_kernel`: flagged rows only (other row blocks return at once) search their split again with the
   canonical distance.
4. `_finish_kernel`: per row, the nearest candidate by the canonical distance over all splits (lower split first,
   so the lowest index wins ties), then the VQ epilogue: gather the code into `quantized` (in z's own layout), a
   partial sum of squared errors, per-code counts (integer atomics) and, for EMA, per-code sums of z.

Every precision returns the same indices: the argmin of the canonical distance ||e||^2 - 2 z.e with z.e summed by
one float32 fma per element in order of d (`_canonical_dot`), lowest index on ties. The search's own distances d~
("exact": float32 tl.dot; "tf32"/"bf16": tensor-core products of rounded inputs) differ from the canonical ones c by
at most B(z, e) (`_bound`), so the nearest code k* satisfies d~(k*) - B(k*) <= c(k*) <= min_j c(j) <=
min_j (d~(j) + B(j)) = U: the search keeps every code with d~ - B <= U (U running, so the test is conservative) and
re-scores those canonically. The bound, with z~ and e~ the inputs the dot product sees, r_z = z - z~, r_e = e - e~:
  |z.e - z~.e~| <= ||z~|| ||r_e|| + ||r_z|| ||e~|| + ||r_z|| ||r_e||        (Cauchy-Schwarz on the residuals)
  float32 accumulation of D products, tensor-core or canonical: <= gamma_D ||z|| ||e||, gamma_D = D u / (1 - D u)
  the final ||e||^2 - 2 dot, in either: <= u (||e||^2 + 2 ||z|| ||e||)
so, with A_z = ||z|| + ||r_z|| (>= ||z||, ||z~||) and A_e likewise, |d~ - c| <=
  A_z (2 ||r_e|| + g A_e) + ||r_z|| 2 (A_e + ||r_e||) + 2 u ||e||^2,   g = 2 gamma_acc + 2 gamma_D + 4.01 u,
times a safety factor for the float32 evaluation of the norms and of the bound itself. u = 2^-23 (twice float32's
unit roundoff: covers truncating hardware) and 2^-22 for tensor-core accumulation. "bf16" rounds in the kernel, so
||r_z|| and ||r_e|| are measured exactly; "tf32" leaves the rounding to the tensor cores (truncation or
round-to-nearest), bounded by 2^-10 ||x||; "exact" has none. Candidates beyond CANDIDATES per row and split flag the
row for the canonical re-search, so the result holds on any data: tensor cores serve the easy rows, the bound the
hard ones. In PyTorch's deterministic mode, per-code float sums are taken by sorting rows by code and summing each
code's rows in order, instead of float atomics.
"""
from __future__ import annotations

import functools
import math
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
CANDIDATES = 8  # codes kept per row and split for the canonical re-scoring; more flag the row
_UNIT = 2.0**-23  # float32 rounding, twice the unit roundoff (round-to-nearest or truncation)
_ACC_UNIT = 2.0**-22  # tensor-core float32 accumulation (some truncate and normalise late)
_TF32_REL = 2.0**-10  # |x - tf32(x)| <= 2^-10 |x|, truncated or rounded
_SAFETY = 1.25  # float32 evaluation of the norms and of the bound itself
# the interpreter's tl.dot on bfloat16 operands is wrong (CPU); there the rounded operands are multiplied as float32,
# which is exact (8-bit significands) and accumulates in float32 as the tensor cores do
_NATIVE_BF16 = tl.constexpr(not triton_interpreted())


# (BLOCK_N, BLOCK_K, warps, stages) the GPU autotuner tries, per K and D bucket and split count
SEARCH_CONFIGS = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
                  for bn, bk, w, s in [(64, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3),
                                       (128, 32, 4, 4), (32, 128, 4, 4), (32, 64, 4, 3)]]
_SPLIT_BLOCK_N = 64  # the row block the split count assumes (autotuned configs use 32 to 128)
_SPLIT_MIN_CODES = 128  # codes per split at least: one widest tile
_FINISH_ROWS = 32  # rows per program of the re-search and finish kernels
_RESEARCH_CODES = 64


def _search_configs():
    """The interpreter takes one small tile; VAEKERNELS_AUTOTUNE=0 takes the first config without tuning (the
    GPU test suite sets it: every tuning compiles each config, and the tests only need a correct one)."""
    if triton_interpreted():
        return [triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4)]
    return SEARCH_CONFIGS if os.environ.get("VAEKERNELS_AUTOTUNE", "1") != "0" else SEARCH_CONFIGS[:1]


@triton.jit
def _rounding(x):
    """x - (x as the dot product sees it), for "bf16", which rounds in the kernel."""
    return x - x.to(tl.bfloat16).to(tl.float32)


@triton.jit
def _square_sums(x, ss, rr, PRECISION: tl.constexpr):
    """Running sums over D tiles of x^2 and, for "bf16", of the rounding residual squared (one row of x each)."""
    ss += tl.sum(x * x, axis=1)
    if PRECISION == 2:
        r = _rounding(x)
        rr += tl.sum(r * r, axis=1)
    return ss, rr


@triton.jit
def _residual_norm(norm, sq_residual, tf32_rel, PRECISION: tl.constexpr):
    """||x - x~||: measured for "bf16", bounded by 2^-10 ||x|| for "tf32", zero for "exact"."""
    if PRECISION == 2:
        return tl.sqrt(sq_residual)
    elif PRECISION == 1:
        return norm * tf32_rel
    else:
        return norm * 0.0


@triton.jit
def _code_stats_kernel(cb_ptr, stats_ptr, K, D, g, two_u, safety, tf32_rel, WIDE: tl.constexpr,
                       PRECISION: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """stats[0] = ||e||^2 (the norms every distance uses), stats[1..3] = the per-code factors P, Q, R of the error
    bound B = A_z P + ||r_z|| Q + R (module docstring)."""
    ks = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = ks < K
    ee = tl.zeros((BLOCK_K,), dtype=tl.float32)
    rr = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        et = tl.load(cb_ptr + _wide(ks[:, None], WIDE) * D + ds[None, :], mask=k_ok[:, None] & (ds[None, :] < D),
                     other=0.0).to(tl.float32)
        ee, rr = _square_sums(et, ee, rr, PRECISION)
    en = tl.sqrt(ee)
    rn = _residual_norm(en, rr, tf32_rel, PRECISION)
    ae = en + rn
    tl.store(stats_ptr + ks, ee, mask=k_ok)
    tl.store(stats_ptr + K + ks, (2.0 * rn + g * ae) * safety, mask=k_ok)
    tl.store(stats_ptr + 2 * K + ks, (ae + rn) * (2.0 * safety), mask=k_ok)
    tl.store(stats_ptr + 3 * K + ks, ee * (two_u * safety), mask=k_ok)


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
            if _NATIVE_BF16:
                dot = tl.dot(zt.to(tl.bfloat16), et.to(tl.bfloat16), dot)
            else:
                dot = tl.dot(zt - _rounding(zt), et - _rounding(et), dot,
                             input_precision="ieee")
        elif PRECISION == 1:
            dot = tl.dot(zt, et, dot, input_precision="tf32")
        else:
            dot = tl.dot(zt, et, dot, input_precision="ieee")
    return dot


@triton.jit
def _canonical(norm, dot):
    """The canonical distance from ||e||^2 and the canonical z.e (one expression, so every kernel rounds alike)."""
    return norm - 2.0 * dot


@triton.jit
def _canonical_dot(acc, zd, ed):
    """One step of the canonical z.e: acc + z_d e_d as one fma, d in ascending order from acc = 0."""
    return tl.fma(zd, ed, acc)


@triton.jit
def _split_range(split, splits, K, BLOCK: tl.constexpr):
    """[begin, end) of this split's codes: the codebook cut into `splits` runs of whole BLOCK-wide tiles."""
    per = tl.cdiv(tl.cdiv(K, BLOCK), splits) * BLOCK
    begin = split * per
    return begin, tl.minimum(K, begin + per)


@triton.autotune(configs=_search_configs(), key=["k_bucket", "d_bucket", "splits"])
@triton.jit
def _search_kernel(z_ptr, cb_ptr, stats_ptr, count_ptr, upper_ptr, lower_ptr, cand_ptr, lo_ptr,
                   N, K, D, M, DM, k_bucket, d_bucket, splits, tf32_rel,
                   WIDE: tl.constexpr, PRECISION: tl.constexpr, ONE_D_TILE: tl.constexpr, BLOCK_D: tl.constexpr,
                   CAND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per (row, split): the codes with d~ - B <= U (their index and d~ - B, at most CAND of them), how many there
    were (-1: the row has a NaN distance), U, the least d~ + B, and the least d~ - B."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    rows = _wide(pid, WIDE) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = (rows // M) * DM + rows % M  # element d of row n sits at row_base + d * M
    d_lanes = tl.arange(0, BLOCK_D)
    z_tile = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    zz = tl.zeros((BLOCK_N,), dtype=tl.float32)
    rr = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # row norms (small D: the rows then stay in registers for the whole sweep)
        ds = d0 + d_lanes
        z_tile = tl.load(z_ptr + row_base[:, None] + _wide(ds[None, :], WIDE) * M,
                         mask=row_ok[:, None] & (ds[None, :] < D), other=0.0).to(tl.float32)
        zz, rr = _square_sums(z_tile, zz, rr, PRECISION)
    zn = tl.sqrt(zz)
    rz = _residual_norm(zn, rr, tf32_rel, PRECISION)
    az = zn + rz
    upper = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    lower = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    count = tl.zeros((BLOCK_N,), dtype=tl.int32)
    has_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
    out = split * N + rows
    k_lanes = tl.arange(0, BLOCK_K)
    k_begin, k_end = _split_range(split, splits, K, BLOCK_K)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + k_lanes
        k_ok = ks < k_end
        dot = _dist_tile(z_tile, z_ptr, row_base, row_ok, cb_ptr, ks, k_ok, D, M,
                         WIDE, ONE_D_TILE, PRECISION, BLOCK_N, BLOCK_K, BLOCK_D)
        dist = tl.load(stats_ptr + ks, mask=k_ok, other=0.0)[None, :] - 2.0 * dot
        has_nan = tl.maximum(has_nan, tl.max((dist != dist).to(tl.int32), axis=1))
        bound = az[:, None] * tl.load(stats_ptr + K + ks, mask=k_ok, other=0.0)[None, :] + \
            tl.load(stats_ptr + 3 * K + ks, mask=k_ok, other=0.0)[None, :]
        if PRECISION != 0:
            bound += rz[:, None] * tl.load(stats_ptr + 2 * K + ks, mask=k_ok, other=0.0)[None, :]
        upper = tl.minimum(upper, tl.min(tl.where(k_ok[None, :], dist + bound, float("inf")), axis=1))
        lo = dist - bound
        lower = tl.minimum(lower, tl.min(tl.where(k_ok[None, :], lo, float("inf")), axis=1))
        near = ((lo <= upper[:, None]) & k_ok[None, :]).to(tl.int32)
        n_near = tl.sum(near, axis=1)
        if tl.max(n_near, axis=0) > 0:
            slot = count[:, None] + tl.cumsum(near, axis=1) - 1
            keep = (near > 0) & (slot < CAND) & row_ok[:, None]
            at = out[:, None] * CAND + slot
            tl.store(cand_ptr + at, tl.broadcast_to(ks[None, :], (BLOCK_N, BLOCK_K)), mask=keep)
            tl.store(lo_ptr + at, lo, mask=keep)
        count += n_near
    tl.store(count_ptr + out, tl.where(has_nan > 0, -1, count), mask=row_ok)
    tl.store(upper_ptr + out, upper, mask=row_ok)
    tl.store(lower_ptr + out, lower, mask=row_ok)


@triton.jit
def _flagged_rows(count_ptr, upper_ptr, lower_ptr, rows, row_ok, N, splits, CAND: tl.constexpr):
    """(flagged, nan, U): rows with more candidates than kept in a split that may hold the nearest code (its least
    d~ - B within the least d~ + B over all splits, U); rows with a NaN distance."""
    upper = tl.full(rows.shape, float("inf"), dtype=tl.float32)
    for s in range(splits):
        upper = tl.minimum(upper, tl.load(upper_ptr + s * N + rows, mask=row_ok, other=float("inf")))
    flagged = tl.zeros(rows.shape, dtype=tl.int1)
    nan = tl.zeros(rows.shape, dtype=tl.int1)
    for s in range(splits):
        c = tl.load(count_ptr + s * N + rows, mask=row_ok, other=0)
        lower = tl.load(lower_ptr + s * N + rows, mask=row_ok, other=float("inf"))
        flagged = flagged | ((c > CAND) & ~(lower > upper))
        nan = nan | (c < 0)
    return flagged & ~nan, nan, upper


@triton.jit
def _research_kernel(z_ptr, cb_ptr, stats_ptr, count_ptr, upper_ptr, lower_ptr, res_d_ptr, res_k_ptr, N, K, D, M, DM,
                     WIDE: tl.constexpr, CAND: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The flagged rows' nearest code of this split by the canonical distance (lowest index on ties, -1 for NaN);
    row blocks without a flagged row return at once."""
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    rows = _wide(tl.program_id(0), WIDE) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    flagged, _, _ = _flagged_rows(count_ptr, upper_ptr, lower_ptr, rows, row_ok, N, splits, CAND)
    if tl.max(flagged.to(tl.int32), axis=0) > 0:
        row_base = (rows // M) * DM + rows % M
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_k = tl.full((BLOCK_N,), 2147483647, dtype=tl.int32)
        has_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
        k_begin, k_end = _split_range(split, splits, K, BLOCK_K)
        for k0 in range(k_begin, k_end, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < k_end
            acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d in range(D):
                zd = tl.load(z_ptr + row_base + _wide(d, WIDE) * M, mask=flagged, other=0.0).to(tl.float32)
                ed = tl.load(cb_ptr + _wide(ks, WIDE) * D + d, mask=k_ok, other=0.0).to(tl.float32)
                acc = _canonical_dot(acc, zd[:, None], ed[None, :])
            dist = _canonical(tl.load(stats_ptr + ks, mask=k_ok, other=0.0)[None, :], acc)
            has_nan = tl.maximum(has_nan, tl.max(((dist != dist) & k_ok[None, :]).to(tl.int32), axis=1))
            dist = tl.where(k_ok[None, :], dist, float("inf"))
            tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True)
            tile_arg = tile_arg + k0
            better = (tile_min < best) | ((tile_min == best) & (tile_arg < best_k))
            best = tl.where(better, tile_min, best)
            best_k = tl.where(better, tile_arg, best_k)
        tl.store(res_d_ptr + split * N + rows, best, mask=flagged)
        tl.store(res_k_ptr + split * N + rows, tl.where(has_nan > 0, -1, best_k), mask=flagged)


@triton.jit
def _finish_kernel(z_ptr, cb_ptr, stats_ptr, count_ptr, upper_ptr, lower_ptr, cand_ptr, lo_ptr, res_d_ptr, res_k_ptr,
                   idx_ptr, flagged_ptr, q_ptr, sq_ptr, counts_ptr, sums_ptr, N, D, M, DM, splits,
                   WIDE: tl.constexpr, CAND: tl.constexpr, EPILOGUE: tl.constexpr, WITH_SUMS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Each row's nearest code over all splits, then the VQ epilogue; flagged_ptr[program] counts flagged rows."""
    pid = tl.program_id(0)
    rows = _wide(pid, WIDE) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    row_base = (rows // M) * DM + rows % M
    flagged, nan_row, upper = _flagged_rows(count_ptr, upper_ptr, lower_ptr, rows, row_ok, N, splits, CAND)
    tl.store(flagged_ptr + pid, tl.sum(flagged.to(tl.int32), axis=0))
    slots = tl.arange(0, CAND)
    usable = row_ok & ~flagged & ~nan_row
    n_valid = tl.zeros((BLOCK_N,), dtype=tl.int32)
    only = tl.zeros((BLOCK_N,), dtype=tl.int32)  # the candidate, where a row has just one (0 where it has none)
    for s in range(splits):
        c = tl.load(count_ptr + s * N + rows, mask=usable, other=0)
        at = (s * N + rows)[:, None] * CAND + slots[None, :]
        valid = (slots[None, :] < c[:, None]) & usable[:, None]
        valid = valid & (tl.load(lo_ptr + at, mask=valid, other=float("inf")) <= upper[:, None])
        n_valid += tl.sum(valid.to(tl.int32), axis=1)
        only = tl.maximum(only, tl.max(tl.where(valid, tl.load(cand_ptr + at, mask=valid, other=0), 0), axis=1))
    idx = only
    if tl.max(n_valid, axis=0) > 1:  # canonical re-scoring; slots run in code order, splits too: lowest index first
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_k = tl.full((BLOCK_N,), 2147483647, dtype=tl.int32)
        several = usable & (n_valid > 1)
        for s in range(splits):
            c = tl.load(count_ptr + s * N + rows, mask=several, other=0)
            at = (s * N + rows)[:, None] * CAND + slots[None, :]
            valid = (slots[None, :] < c[:, None]) & several[:, None]
            valid = valid & (tl.load(lo_ptr + at, mask=valid, other=float("inf")) <= upper[:, None])
            if tl.max(tl.sum(valid.to(tl.int32), axis=1), axis=0) > 0:
                ks = tl.load(cand_ptr + at, mask=valid, other=0)
                acc = tl.zeros((BLOCK_N, CAND), dtype=tl.float32)
                for d in range(D):
                    zd = tl.load(z_ptr + row_base + _wide(d, WIDE) * M, mask=several, other=0.0).to(tl.float32)
                    ed = tl.load(cb_ptr + _wide(ks, WIDE) * D + d, mask=valid, other=0.0).to(tl.float32)
                    acc = _canonical_dot(acc, zd[:, None], ed)
                dist = _canonical(tl.load(stats_ptr + ks, mask=valid, other=0.0), acc)
                dist = tl.where(valid, dist, float("inf"))
                tile_min, tile_arg = tl.min(dist, axis=1, return_indices=True)
                tile_k = tl.max(tl.where(slots[None, :] == tile_arg[:, None], ks, 0), axis=1)
                better = (tl.max(valid.to(tl.int32), axis=1) > 0) & (
                    (tile_min < best) | ((tile_min == best) & (tile_k < best_k)))
                best = tl.where(better, tile_min, best)
                best_k = tl.where(better, tile_k, best_k)
        idx = tl.where(several, best_k, idx)
    if tl.max(flagged.to(tl.int32), axis=0) > 0:  # the re-search's results, merged in split order
        best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
        best_k = tl.full((BLOCK_N,), 2147483647, dtype=tl.int32)
        for s in range(splits):
            d_s = tl.load(res_d_ptr + s * N + rows, mask=flagged, other=float("inf"))
            k_s = tl.load(res_k_ptr + s * N + rows, mask=flagged, other=2147483647)
            nan_row = nan_row | (flagged & (k_s < 0))
            better = (d_s < best) | ((d_s == best) & (k_s < best_k))
            best = tl.where(better, d_s, best)
            best_k = tl.where(better, k_s, best_k)
        idx = tl.where(flagged, best_k, idx)
    tl.store(idx_ptr + rows, tl.where(nan_row, -1, idx).to(tl.int64), mask=row_ok)
    if EPILOGUE:
        _epilogue(z_ptr, cb_ptr, q_ptr, sq_ptr, counts_ptr, sums_ptr, pid, rows, row_ok, row_base, idx, nan_row,
                  D, M, WIDE, WITH_SUMS, BLOCK_N, BLOCK_D)


@triton.jit
def _epilogue(z_ptr, cb_ptr, q_ptr, sq_ptr, counts_ptr, sums_ptr, pid, rows, row_ok, row_base, idx, nan_row,
              D, M, WIDE: tl.constexpr, WITH_SUMS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The chosen codes into quantized (NaN rows: NaN), this program's sum of squared errors, per-code counts and,
    WITH_SUMS, per-code sums of z (float atomics)."""
    valid = row_ok & ~nan_row
    sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ds[None, :] < D)
        offs = row_base[:, None] + _wide(ds[None, :], WIDE) * M
        zt = tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        et = tl.load(cb_ptr + _wide(idx[:, None], WIDE) * D + ds[None, :], mask=mask, other=0.0)
        et = tl.where(nan_row[:, None], float("nan"), et.to(tl.float32))
        tl.store(q_ptr + offs, et.to(q_ptr.dtype.element_ty), mask=mask)
        diff = tl.where(mask, et - zt, 0.0)
        sq += tl.sum(diff * diff, axis=1)
        if WITH_SUMS:
            tl.atomic_add(sums_ptr + _wide(idx[:, None], WIDE) * D + ds[None, :], zt, mask=mask & valid[:, None])
    tl.store(sq_ptr + pid, tl.sum(sq, axis=0))
    tl.atomic_add(counts_ptr + idx, tl.full((BLOCK_N,), 1, tl.int64), mask=valid)


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


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def search_splits(n: int, k: int, device: torch.device) -> int:
    """How many code ranges the search cuts the codebook into: enough programs for about two waves over the GPU's
    SMs when rows alone do not fill it (1 when they do, and on the interpreter), each range one widest tile or
    more. VAEKERNELS_SEARCH_SPLIT=S forces S (tests, tuning)."""
    forced = os.environ.get("VAEKERNELS_SEARCH_SPLIT")
    if forced:
        if not forced.isdigit() or int(forced) < 1:
            raise ValueError(f"VAEKERNELS_SEARCH_SPLIT must be a positive integer, got {forced!r}")
        return int(forced)
    return split_count(n, k, _sm_count(device)) if device.type == "cuda" else 1


def split_count(n: int, k: int, sms: int) -> int:
    """The split count for N rows and K codes on a GPU with `sms` SMs (two waves of programs, or rows alone)."""
    row_blocks = triton.cdiv(n, _SPLIT_BLOCK_N)
    target = 2 * sms
    if row_blocks >= target:
        return 1
    return max(1, min(triton.cdiv(target, row_blocks), triton.cdiv(k, _SPLIT_MIN_CODES)))


def _gamma(d: int, unit: float) -> float:
    """gamma_D = D u / (1 - D u): the relative error bound of a float32 sum of D products."""
    return d * unit / (1.0 - d * unit) if d * unit < 0.5 else math.inf


def _search(zc, n, d, m, dm, codebook, precision, epilogue, with_sums):
    """(indices, quantized, squared-error partials, counts, sums, flagged-row partials) of the row layout zc."""
    cb = codebook.contiguous()
    k = cb.shape[0]
    dev = zc.device
    splits = search_splits(n, k, dev)
    wide = max(zc.numel(), cb.numel(), splits * n * CANDIDATES) >= _common.WIDE_OFFSETS
    code = _PRECISION[precision]
    stats = torch.empty((4, k), dtype=torch.float32, device=dev)
    block_d = _block_d(d)
    _code_stats_kernel[(triton.cdiv(k, 64),)](
        cb, stats, k, d, 2 * _gamma(d, _ACC_UNIT) + 2 * _gamma(d, _UNIT) + 4.01 * _UNIT, 2 * _UNIT, _SAFETY,
        _TF32_REL,
        WIDE=wide, PRECISION=code, BLOCK_K=64, BLOCK_D=min(triton.next_power_of_2(d), 32))
    count = torch.empty((splits, n), dtype=torch.int32, device=dev)
    upper = torch.empty((splits, n), dtype=torch.float32, device=dev)
    lower = torch.empty((splits, n), dtype=torch.float32, device=dev)
    cand = torch.empty((splits, n, CANDIDATES), dtype=torch.int32, device=dev)
    lo = torch.empty((splits, n, CANDIDATES), dtype=torch.float32, device=dev)
    _search_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), splits)](
        zc, cb, stats, count, upper, lower, cand, lo, n, k, d, m, dm, _bucket(k), _bucket(d), splits, _TF32_REL,
        WIDE=wide, PRECISION=code, ONE_D_TILE=d <= block_d, BLOCK_D=block_d, CAND=CANDIDATES)
    res_d = torch.empty((splits, n), dtype=torch.float32, device=dev)
    res_k = torch.empty((splits, n), dtype=torch.int32, device=dev)
    rows_grid = triton.cdiv(n, _FINISH_ROWS)
    _research_kernel[(rows_grid, splits)](
        zc, cb, stats, count, upper, lower, res_d, res_k, n, k, d, m, dm,
        WIDE=wide, CAND=CANDIDATES, BLOCK_N=_FINISH_ROWS, BLOCK_K=_RESEARCH_CODES)
    idx = torch.empty(n, dtype=torch.int64, device=dev)
    flagged = torch.empty(rows_grid, dtype=torch.int32, device=dev)
    # outputs the launch does not write get 1-element stand-ins, left unfilled (no fill launch)
    stand_in = functools.partial(torch.empty, 1, device=dev)
    q = torch.empty_like(zc) if epilogue else zc.new_empty(1)
    sq = torch.empty(rows_grid, dtype=torch.float32, device=dev) if epilogue else stand_in()
    counts = torch.zeros(k, dtype=torch.int64, device=dev) if epilogue else stand_in(dtype=torch.int64)
    sums = torch.zeros(cb.shape, dtype=torch.float32, device=dev) if with_sums else stand_in()
    _finish_kernel[(rows_grid,)](
        zc, cb, stats, count, upper, lower, cand, lo, res_d, res_k, idx, flagged, q, sq, counts, sums, n, d, m, dm,
        splits,
        WIDE=wide, CAND=CANDIDATES, EPILOGUE=epilogue, WITH_SUMS=with_sums, BLOCK_N=_FINISH_ROWS,
        BLOCK_D=min(triton.next_power_of_2(d), 32))
    return idx, q, sq, counts, (sums if with_sums else None), flagged


def flagged_rows(z, codebook, dim=-1, precision="exact") -> int:
    """How many rows of z the search of `precision` flagged and re-searched with the canonical distance (more close
    candidates than it keeps): the cost of the guarantee, for benchmarks and tests."""
    zc, n, d, m, dm = row_layout(z, dim % z.dim())
    return int(_search(zc, n, d, m, dm, codebook, precision, epilogue=False, with_sums=False)[-1].sum())


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
    idx, q, sq, counts, sums, _ = _search(zc, n, d, m, dm, codebook, precision, epilogue=True,
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
