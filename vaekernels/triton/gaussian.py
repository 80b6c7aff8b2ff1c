"""Triton kernels for reparameterization, Gaussian KL and their fusion.

Forward: one kernel reads mu and logvar once, draws eps with Philox (`tl.randn(seed, flat index)`), writes z and
the KL (elementwise, or per-program partial sums that a second small pass reduces in a fixed order; small inputs
take a single program and a single launch). Backward: one elementwise pass that regenerates eps from the seed.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ..reference import gaussian as reference
from . import _common
from ._common import MAX_PROGRAMS, _wide, reduce_rows

# kl_mode codes (constexpr in the kernels)
NONE, ELEMENTWISE, SUM, LATENT, SAMPLE = 0, 1, 2, 3, 4
_MODES = {"none": NONE, "elementwise": ELEMENTWISE, "sum": SUM, "latent": LATENT, "sample": SAMPLE}
BLOCK = 1024
SINGLE_PROGRAM = 1 << 14  # up to this many elements, one program does everything (one launch)


@triton.jit
def _element(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, z_ptr, kl_ptr, seed, offs, mask,
             SAMPLE_Z: tl.constexpr, KL_MODE: tl.constexpr, HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr):
    """z and KL for one block of flat offsets; stores z (and elementwise KL), returns the float32 KL (0 off-mask)."""
    mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if SAMPLE_Z:
        z = mu + tl.exp(0.5 * lv) * tl.randn(seed, offs)
        tl.store(z_ptr + offs, z.to(z_ptr.dtype.element_ty), mask=mask)
    kl = tl.zeros_like(mu)
    if KL_MODE != 0:
        diff = mu
        if HAS_PMU:
            diff = mu - tl.load(pmu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_PLV:
            plv = tl.load(plv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            kl = 0.5 * (plv - lv + (tl.exp(lv) + diff * diff) * tl.exp(-plv) - 1.0)
        else:
            kl = 0.5 * (tl.exp(lv) + diff * diff - 1.0 - lv)
        if KL_MODE == 1:
            tl.store(kl_ptr + offs, kl.to(kl_ptr.dtype.element_ty), mask=mask)
        kl = tl.where(mask, kl, 0.0)
    return kl


@triton.jit
def _seed(seed_arg, SEED_ON_HOST: tl.constexpr):
    """The Philox seed: the argument itself (SEED_ON_HOST) or the 0-d int64 tensor it points to."""
    if SEED_ON_HOST:
        seed = seed_arg.to(tl.int64)
    else:
        seed = tl.load(seed_arg)
    return seed


@triton.jit
def _forward_kernel(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, seed_arg, z_ptr, kl_ptr, out_ptr, scale,
                    B, L, ROW_TILES, COL_TILES,
                    SAMPLE_Z: tl.constexpr, SEED_ON_HOST: tl.constexpr, KL_MODE: tl.constexpr, HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr,
                    DIRECT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """The (B, L) view is cut into (BLOCK_R, BLOCK_C) tiles; program (i, j) walks ROW_TILES x COL_TILES of them.

    SUM writes one partial per program; LATENT one partial row of column sums per row group; SAMPLE one partial
    per row and column group. DIRECT (a single partial per output) writes scale * result straight to out.
    """
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    seed = 0
    if SAMPLE_Z:
        seed = _seed(seed_arg, SEED_ON_HOST)
    rt0 = pid_r * ROW_TILES
    ct0 = pid_c * COL_TILES
    row_lanes = tl.arange(0, BLOCK_R)
    col_lanes = tl.arange(0, BLOCK_C)
    row_len = tl.cast(L, tl.int64)  # int64 offsets: B * L may pass 2**31
    if KL_MODE == 4:  # per-sample sums: row tiles outer
        for rt in range(rt0, rt0 + ROW_TILES):
            rows = rt * BLOCK_R + row_lanes
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for ct in range(ct0, ct0 + COL_TILES):
                cols = ct * BLOCK_C + col_lanes
                offs = rows[:, None] * row_len + cols[None, :]
                mask = (rows[:, None] < B) & (cols[None, :] < L)
                acc += _element(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, z_ptr, kl_ptr, seed, offs, mask,
                                SAMPLE_Z, KL_MODE, HAS_PMU, HAS_PLV)
            sums = tl.sum(acc, axis=1)
            if DIRECT:
                tl.store(out_ptr + rows, sums * scale, mask=rows < B)
            else:
                tl.store(out_ptr + pid_c * B + rows, sums, mask=rows < B)
    else:  # column tiles outer
        total = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
        for ct in range(ct0, ct0 + COL_TILES):
            cols = ct * BLOCK_C + col_lanes
            acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
            for rt in range(rt0, rt0 + ROW_TILES):
                rows = rt * BLOCK_R + row_lanes
                offs = rows[:, None] * row_len + cols[None, :]
                mask = (rows[:, None] < B) & (cols[None, :] < L)
                acc += _element(mu_ptr, lv_ptr, pmu_ptr, plv_ptr, z_ptr, kl_ptr, seed, offs, mask,
                                SAMPLE_Z, KL_MODE, HAS_PMU, HAS_PLV)
            if KL_MODE == 3:
                sums = tl.sum(acc, axis=0)
                if DIRECT:
                    tl.store(out_ptr + cols, sums * scale, mask=cols < L)
                else:
                    tl.store(out_ptr + pid_r * row_len + cols, sums, mask=cols < L)
            total += acc
        if KL_MODE == 2:
            result = tl.sum(tl.sum(total, axis=1), axis=0)
            if DIRECT:
                tl.store(out_ptr, result * scale)
            else:
                tl.store(out_ptr + pid_r * tl.num_programs(1) + pid_c, result)


@triton.jit
def _backward_kernel(dz_ptr, w_ptr, w_scale, mu_ptr, lv_ptr, pmu_ptr, plv_ptr, seed_arg,
                     dmu_ptr, dlv_ptr, dpmu_ptr, dplv_ptr, n, L,
                     HAS_DZ: tl.constexpr, SEED_ON_HOST: tl.constexpr, KL_MODE: tl.constexpr, HAS_PMU: tl.constexpr, HAS_PLV: tl.constexpr,
                     WIDE: tl.constexpr, BLOCK: tl.constexpr):
    """dmu = dz + w dKL/dmu, dlogvar = 0.5 dz sigma eps + w dKL/dlogvar, and the prior gradients, in one pass.

    w is w_scale times the KL's incoming gradient: per element (1), one scalar (2), per latent column (3) or per
    sample row (4).
    """
    offs = _wide(tl.program_id(0), WIDE) * BLOCK + tl.arange(0, BLOCK)  # Philox draws the same for either width
    mask = offs < n
    lv = tl.load(lv_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dlv = tl.zeros_like(lv)
    if HAS_DZ:
        dz = tl.load(dz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dlv = 0.5 * dz * tl.exp(0.5 * lv) * tl.randn(_seed(seed_arg, SEED_ON_HOST), offs)
    if KL_MODE != 0:
        mu = tl.load(mu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if KL_MODE == 1:
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        elif KL_MODE == 2:
            w = tl.load(w_ptr).to(tl.float32)
        elif KL_MODE == 3:
            w = tl.load(w_ptr + offs % L, mask=mask, other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptr + offs // L, mask=mask, other=0.0).to(tl.float32)
        w = w * w_scale
        diff = mu
        if HAS_PMU:
            diff = mu - tl.load(pmu_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        var = tl.exp(lv)
        if HAS_PLV:
            inv_pvar = tl.exp(-tl.load(plv_ptr + offs, mask=mask, other=0.0).to(tl.float32))
            d_mu = w * diff * inv_pvar
            dlv += w * 0.5 * (var * inv_pvar - 1.0)
            tl.store(dplv_ptr + offs, (w * 0.5 * (1.0 - (var + diff * diff) * inv_pvar)).to(dplv_ptr.dtype.element_ty),
                     mask=mask)
        else:
            d_mu = w * diff
            dlv += w * 0.5 * (var - 1.0)
        if HAS_PMU:
            tl.store(dpmu_ptr + offs, (-d_mu).to(dpmu_ptr.dtype.element_ty), mask=mask)
        if HAS_DZ:
            d_mu += dz
        tl.store(dmu_ptr + offs, d_mu.to(dmu_ptr.dtype.element_ty), mask=mask)
    tl.store(dlv_ptr + offs, dlv.to(dlv_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=1024)
def _tiles(b: int, length: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_C): BLOCK elements per tile, as wide as the rows allow."""
    block_c = min(triton.next_power_of_2(length), BLOCK)
    return BLOCK // block_c, block_c


@functools.lru_cache(maxsize=1024)
def _plan(kl_mode: int, b: int, length: int) -> tuple[int, int, int, int]:
    """(row groups, column groups, row tiles per program, column tiles per program) for the forward grid."""
    block_r, block_c = _tiles(b, length)
    r, c = triton.cdiv(b, block_r), triton.cdiv(length, block_c)
    if b * length <= SINGLE_PROGRAM:
        return 1, 1, r, c
    if kl_mode == LATENT:
        groups = max(1, min(r, MAX_PROGRAMS // c))
        per = triton.cdiv(r, groups)
        return triton.cdiv(r, per), c, per, 1
    if kl_mode == SAMPLE:
        row_per = triton.cdiv(r, MAX_PROGRAMS)
        row_groups = triton.cdiv(r, row_per)
        col_per = triton.cdiv(c, max(1, min(c, MAX_PROGRAMS // row_groups)))
        return row_groups, triton.cdiv(c, col_per), row_per, col_per
    per = triton.cdiv(c, MAX_PROGRAMS) if kl_mode == SUM else 1
    return 1, triton.cdiv(c, per), 1, per


def gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale):
    if mu.dtype == torch.float64:  # float64 goes to the reference (the kernels compute in float32)
        return reference.gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale)
    mode = _MODES[kl_mode]
    b = mu.shape[0] if mode in (LATENT, SAMPLE) else 1
    length = mu.numel() // b
    z = torch.empty_like(mu) if seed is not None else None
    kl = torch.empty_like(mu) if mode == ELEMENTWISE else None
    row_groups, col_groups, row_tiles, col_tiles = _plan(mode, b, length)
    writers = {SUM: row_groups * col_groups, LATENT: row_groups, SAMPLE: col_groups}.get(mode, 0)
    direct = writers == 1
    out = partial = None
    if writers:
        out = mu.new_empty({SUM: (), LATENT: (length,), SAMPLE: (b,)}[mode], dtype=torch.float32)
        partial = out if direct else mu.new_empty((writers, out.numel()), dtype=torch.float32)
    block_r, block_c = _tiles(b, length)
    dummy = mu
    seed_value, seed_on_host = _common.seed_arg(seed) if seed is not None else (0, True)
    _forward_kernel[(row_groups, col_groups)](
        mu, logvar, prior_mu if prior_mu is not None else dummy, prior_logvar if prior_logvar is not None else dummy,
        seed_value, z if z is not None else dummy, kl if kl is not None else dummy,
        partial if partial is not None else dummy, kl_scale, b, length, row_tiles, col_tiles,
        SAMPLE_Z=seed is not None, SEED_ON_HOST=seed_on_host, KL_MODE=mode, HAS_PMU=prior_mu is not None, HAS_PLV=prior_logvar is not None,
        DIRECT=direct, BLOCK_R=block_r, BLOCK_C=block_c)
    if writers and not direct:
        reduce_rows(partial, kl_scale, out.view(-1))
    return z, (kl if mode == ELEMENTWISE else out)


def gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale):  # z unused: eps is regenerated
    if mu.dtype == torch.float64:
        return reference.gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale)
    mode = _MODES[kl_mode] if dkl is not None else NONE
    has_dz = dz is not None and seed is not None
    n = mu.numel()
    length = n // mu.shape[0] if mode in (LATENT, SAMPLE) else 1
    dlv = torch.empty_like(logvar)
    dmu = torch.empty_like(mu) if mode != NONE else None
    dpmu = torch.empty_like(prior_mu) if prior_mu is not None and mode != NONE else None
    dplv = torch.empty_like(prior_logvar) if prior_logvar is not None and mode != NONE else None
    dummy = mu
    seed_value, seed_on_host = _common.seed_arg(seed) if has_dz else (0, True)
    _backward_kernel[(triton.cdiv(n, BLOCK),)](
        dz.contiguous() if has_dz else dummy, dkl.contiguous() if dkl is not None else dummy, kl_scale, mu, logvar,
        prior_mu if prior_mu is not None else dummy, prior_logvar if prior_logvar is not None else dummy,
        seed_value, dmu if dmu is not None else dummy, dlv,
        dpmu if dpmu is not None else dummy, dplv if dplv is not None else dummy, n, length,
        HAS_DZ=has_dz, SEED_ON_HOST=seed_on_host, KL_MODE=mode, HAS_PMU=dpmu is not None, HAS_PLV=dplv is not None,
        WIDE=n + BLOCK >= _common.WIDE_OFFSETS, BLOCK=BLOCK)
    return dmu, dlv, dpmu, dplv
