"""Philox4x32-10 on plain tensors: the exact stream of Triton's `tl.randn(seed, offset)`.

Used by the PyTorch backend for sampling, so that for one seed every backend draws the same eps,
and by the tests to check the Triton and CUDA samples element by element.
Key = (seed & 0xffffffff, seed >> 32), counter = (offset & 0xffffffff, offset >> 32, 0, 0).
"""
from __future__ import annotations


import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_CHUNK = 1 << 20  # elements per chunk, bounds the int64 temporaries


def philox_uint32x2(seed: torch.Tensor | int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The first two uint32 outputs (as int64) of Philox4x32-10 for each offset (seed: int or 0-d int64 tensor on
    the offsets' device, read on that device, so a GPU seed is never copied to the host).

    Each round multiplies two uint32 words by uint32 constants: the product is below 2**64 and int64
    multiplication wraps modulo 2**64, so its high and low words come out exact. Updates run in place."""
    c0, c1 = offsets & _M32, (offsets >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        prod_b, prod_a = c2.mul_(_ROUND_B), c0.mul_(_ROUND_A)
        c0 = (prod_b >> 32).bitwise_xor_(c1).bitwise_xor_(k0).bitwise_and_(_M32)
        c2 = (prod_a >> 32).bitwise_xor_(c3).bitwise_xor_(k1).bitwise_and_(_M32)
        c1, c3 = prod_b.bitwise_and_(_M32), prod_a.bitwise_and_(_M32)
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1


def _uniform(x: torch.Tensor) -> torch.Tensor:
    x = torch.where(x >= 1 << 31, x - (1 << 32), x)  # bitcast to int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * 4.6566127342e-10


def randn(seed: torch.Tensor | int, numel: int, device=None) -> torch.Tensor:
    """float32 normals for offsets 0..numel-1, equal to `tl.randn(seed, offsets)`."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    for start in range(0, numel, _CHUNK):
        offsets = torch.arange(start, min(start + _CHUNK, numel), dtype=torch.int64, device=device)
        i1, i2 = philox_uint32x2(seed, offsets)
        u1 = torch.clamp_min(_uniform(i1), 1e-7)
        theta = 6.283185307179586 * _uniform(i2)
        out[start : start + offsets.numel()] = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(theta)
    return out


_M64 = (1 << 64) - 1


def _mix(seed: int, offset: int) -> int:
    """A 62-bit seed from a generator's (seed, Philox offset): splitmix64's finaliser, so nearby offsets give
    unrelated seeds."""
    x = (seed * 0x9E3779B97F4A7C15 + offset + 1) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return (x ^ (x >> 31)) >> 2


def draw_seed(device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
    """A 0-d int64 seed for one sampling call, from torch's generator for `device` (or `generator`), so that
    `torch.manual_seed` reproduces every sample and each call draws fresh noise.

    Eager calls keep the seed on the host, drawn without a device launch: on the CPU with torch.randint; for
    CUDA latents from the CUDA generator's Philox state (its seed and offset, which advances by 4 as one draw of
    PyTorch's own would). Under torch.compile or CUDA-graph capture the seed is drawn on the device with
    torch.randint, as inductor does, so each graph replay draws anew. A generator on another device (a CPU
    generator for CUDA latents, as diffusers allows) draws on its own device."""
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        return torch.randint(2**62, (), dtype=torch.int64, generator=generator, device=generator.device)
    if device.type == "cuda" and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing():
        gen = generator or torch.cuda.default_generators[device.index if device.index is not None
                                                         else torch.cuda.current_device()]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return torch.tensor(_mix(gen.initial_seed(), offset), dtype=torch.int64)
    return torch.randint(2**62, (), dtype=torch.int64, device=device, generator=generator)


__all__ = ["randn", "draw_seed", "philox_uint32x2"]
