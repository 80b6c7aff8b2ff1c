"""Launch helpers shared by the Triton kernels: offset width, deterministic partial-sum reduction, row layout."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_PROGRAMS = 1024  # programs that write partial sums; the second pass reduces at most this many per output
WIDE_OFFSETS = 2**31  # from this many elements, kernels compute offsets in int64 (their WIDE variant)


@triton.jit
def _wide(x, WIDE: tl.constexpr):
    """x as int64 when offsets may pass 2**31 (WIDE), else unchanged: 32-bit offsets take half the registers
    of 64-bit ones in 2-D tiles of addresses, and 32-bit division is far cheaper than emulated 64-bit division."""
    if WIDE:
        x = x.to(tl.int64)
    return x


@triton.jit
def reduce_rows_kernel(partial_ptr, out_ptr, scale, G, M, BLOCK_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """out[m] = scale * sum_g partial[g, m], summing in a fixed order (bitwise reproducible)."""
    cols = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_G, BLOCK_M), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        mask = (g[:, None] < G) & (cols[None, :] < M)
        acc += tl.load(partial_ptr + g[:, None].to(tl.int64) * M + cols[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + cols, tl.sum(acc, axis=0) * scale, mask=cols < M)


def seed_arg(seed: torch.Tensor) -> tuple[int | torch.Tensor, bool]:
    """(kernel argument, SEED_ON_HOST) for the op's 0-d int64 seed: its value when it lives on the host (eager
    calls draw it there, see philox.draw_seed: no device read, no extra launch), else the tensor itself, read by
    the kernel (a seed drawn on the GPU inside torch.compile or CUDA-graph capture)."""
    if seed.device.type == "cpu":
        return int(seed), True
    return seed, False


def reduce_rows(partial: torch.Tensor, scale: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """scale * partial.sum(0) for a contiguous float32 (G, M) tensor, deterministically; out has M elements."""
    g, m = partial.shape
    out = partial.new_empty(m) if out is None else out
    block_m = min(triton.next_power_of_2(m), 128)
    block_g = max(1, min(triton.next_power_of_2(g), 4096 // block_m))
    reduce_rows_kernel[(triton.cdiv(m, block_m),)](partial, out, scale, g, m, BLOCK_G=block_g, BLOCK_M=block_m)
    return out


def row_layout(t: torch.Tensor, dim: int) -> tuple[torch.Tensor, int, int, int, int]:
    """(contiguous t, N rows, D, inner size M, and D*M): row n = a*M + m of t viewed as (A, D, M) has
    element d at a*D*M + d*M + m, so channel-first tensors are read in place, without a permute copy."""
    t = t.contiguous()
    d = t.shape[dim]
    m = 1
    for s in t.shape[dim + 1 :]:
        m *= s
    return t, t.numel() // d if d else 0, d, m, d * m
