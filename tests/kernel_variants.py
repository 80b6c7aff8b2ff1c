"""Every kernel variant the ops launch, as one workload of backend calls on tiny inputs.

Each op x dtype x precision x flag: the Gaussian forward and backward of every KL mode, with and without
sampling and priors, in one and many programs, on aligned and misaligned data, the seed on the host and on the
device; the search with and without the VQ epilogue and its EMA sums, every precision (16-bit rows on the
tensor-core paths too), D in one tile and looped, rows channel-first and channel-last; the VQ backward with each
estimator and optional gradient; the deterministic paths; the int64-offset variants; LFQ's and IBQ's code passes.
Two users:
- tests/test_triton_compile.py records the Triton launches the workload makes under the interpreter and compiles
  each for real GPUs;
- bench/gpu_smoke.py runs it on each fused backend against the reference (bench/gpu_check.sh first-contact on a
  GPU; tests/test_gpu_check.py in CI, through the interpreter).

`call(name, *args)` runs one function of the backend contract (vaekernels/reference/__init__.py) and returns its
outputs; later calls use only their shapes and indices, so `call` may return another backend's outputs.
"""
from __future__ import annotations

import contextlib

import torch

from vaekernels.reference import philox

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_flags: list[str] = []  # the variant-selecting modes in force (named in bench/gpu_smoke.py's messages)


def run(call, device: torch.device) -> None:
    """The whole workload on `device`."""
    gaussian(call, device)
    vq(call, device)
    lfq(call, device)
    ibq(call, device)
    with _int64_offsets():
        _wide(call, device)
    with _device_seeds(device):
        _sampling(call, device)


def flags() -> list[str]:
    """The modes that select kernel variants beyond the arguments: deterministic, int64 offsets, device seeds."""
    return _flags + ["deterministic"] * torch.are_deterministic_algorithms_enabled()


def gaussian(call, device: torch.device) -> None:
    """Forward and backward of every kl_mode, with and without sampling and priors, in one and many programs;
    float16 and bfloat16 on the fused sample + KL with priors; misaligned data (the CUDA kernels' scalar path)."""
    for dtype in DTYPES:
        for shape in [(3, 50), (20, 1000)]:  # 150 elements: one program, direct; 20000: partial sums, reduction
            g = torch.Generator().manual_seed(0)
            mu, lv = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(2))
            seed = philox.draw_seed(mu.device)
            full = dtype == torch.float32 and shape[0] > 3
            for mode in ["none", "elementwise", "sum", "latent", "sample"] if dtype == torch.float32 else ["sum"]:
                for s in [seed, None] if full and mode != "none" else [seed]:
                    priors = [(None, None), (mu, lv)] if full else [(mu, lv)]
                    for prior in priors + ([(mu, None), (None, lv)] if full and mode == "sum" else []):
                        _gaussian_step(call, mu, lv, prior, s, mode)
    flat = torch.randn(2, 4 * 64 + 1, generator=torch.Generator().manual_seed(0)).to(device)
    mu, lv = flat[0, 1:].view(4, 64), flat[1, 1:].view(4, 64)  # contiguous, 4 bytes past 16-byte alignment
    _gaussian_step(call, mu, lv, (None, None), philox.draw_seed(mu.device), "sum")


def _gaussian_step(call, mu, lv, prior, seed, mode):
    """Forward, then backward as the op runs it on a GPU (eps regenerated from the seed; elementwise KL unscaled)."""
    z, kl = call("gaussian_forward", mu, lv, *prior, seed, mode, 0.5)
    dz = torch.ones_like(mu) if seed is not None else None
    dkl = torch.ones_like(kl) if kl is not None else None
    call("gaussian_backward", dz, dkl, mu, lv, *prior, seed, None, mode, 1.0 if mode == "elementwise" else 0.5)


def vq(call, device: torch.device) -> None:
    """Search with and without the epilogue and EMA sums, every precision, small and large D, channel-first
    rows, the backward with each estimator, commitment and codebook scatter, and the deterministic paths;
    float16 and bfloat16 on the forward and backward of small D and on the tensor-core searches; channel-last rows."""
    one = torch.ones((), device=device)
    for dtype in DTYPES:
        # D in one 16- or 32-wide tile (rows kept in registers), or looped in tiles
        for d, k in [(8, 70), (32, 50), (96, 40)] if dtype == torch.float32 else [(8, 70)]:
            z, cb = _near_codes((2, d, 5, 7), 1, k, dtype, device)  # channel-first: rows read through strides
            full = dtype == torch.float32 and d == 8
            for precision in ["exact", "tf32", "bf16"] if dtype == torch.float32 else ["exact"]:
                if full:
                    call("nearest_code", z, cb, 1, precision)
                    call("vq_forward", z, cb, 1, precision, False)
                q, idx, *_ = call("vq_forward", z, cb, 1, precision, True)
            for estimator in ["ste", "rotation"] if dtype == torch.float32 else ["rotation"]:
                for dq, commit, code in [(q, one, one), (q, None, None), (None, one, one), (q, one, None)][
                        : 4 if full else 1]:
                    call("vq_backward", dq, z, cb, idx, commit, code, 1, estimator)
            with deterministic():  # the search kernel runs here: the segment sums sort its indices
                q, idx, *_ = call("vq_forward", z, cb, 1, "exact", True)
                call("vq_backward", q, z, cb, idx, one, one, 1, "ste")
        if dtype != torch.float32:  # 16-bit rows on the tensor-core search (from D = 32 in the CUDA backend)
            z, cb = _near_codes((2, 32, 5, 7), 1, 50, dtype, device)
            for precision in ["tf32", "bf16"]:
                call("vq_forward", z, cb, 1, precision, True)
    for d, k in [(8, 70), (96, 40)]:  # channel-last rows: D contiguous
        z, cb = _near_codes((70, d), 1, k, torch.float32, device)
        q, idx, *_ = call("vq_forward", z, cb, 1, "exact", True)
        call("vq_backward", q, z, cb, idx, one, one, 1, "rotation")


def lfq(call, device: torch.device) -> None:
    """Both entropies forward, the backward with each code-pass gradient (batch distribution, clamped per-sample
    entropy, both); K = 1 (no high bits), small (masked code tiles) and odd with groups, channel-first and
    spherical, K = 12 (full code tiles: the average's 64 x 64 tensor-core tiles); tokens in one and several average
    splits; float16 and bfloat16 inputs."""
    one = torch.ones((), device=device)
    cases = [((70, 1), -1, 1, False), ((3, 10, 5, 6), 1, 2, True), ((4, 12), -1, 1, False)]
    for dtype in DTYPES:
        for shape, dim, groups, spherical in cases if dtype == torch.float32 else cases[:1]:
            x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
            for clamped in (False, True):
                args = (x, dim, 2.0, 1.0, spherical, groups, clamped, 1e-5)
                q, _, avg, *_ = call("lfq_forward", *args)
                for d_avg, d_ps in [(torch.ones_like(avg), one), (torch.ones_like(avg), None), (None, one)][
                        : 3 if clamped and dtype == torch.float32 else 1]:
                    call("lfq_backward", torch.ones_like(q), d_avg, d_ps, one, *args)


def ibq(call, device: torch.device) -> None:
    """IBQ's sweep with and without the entropy, its column sums, rho, dz and dC passes with each gradient (all,
    the quantization loss alone: no entropy terms, the batch distribution alone); every column-chunk plan (D <= 64:
    one chunk; D = 100: dC in two; D = 256: P C and dz in two, dC in four), several code and row ranges, tails,
    channel-first; float16 and bfloat16 inputs (one tf32 product for the logits; on the channel-first case, the
    cheapest under the interpreter with several code tiles)."""
    one = torch.ones((), device=device)
    cases = [((70, 8), -1, 300), ((2, 20, 3, 3), 1, 130), ((24, 100), -1, 40), ((20, 256), -1, 70)]
    for dtype in DTYPES:
        for shape, dim, k in cases if dtype == torch.float32 else cases[1:2]:
            g = torch.Generator().manual_seed(0)
            z = torch.randn(shape, generator=g).to(device, dtype)
            cb = torch.randn(k, shape[dim], generator=g).to(device, dtype)
            dim = dim % z.dim()
            for entropy in (True, False) if dtype == torch.float32 else (True,):
                q, ind, avg, ps, quant, stats, pc = call("ibq_forward", z, cb, dim, 0.25, 0.5, entropy)
                rest = (z, cb, ind, stats, pc, dim, 0.25, 0.5)
                d_avg = torch.ones(k, device=device)
                grads = [(d_avg, one, one), (None, None, one), (d_avg, None, None)]
                for d_avg, d_ps, d_quant in grads if entropy else grads[1:2]:
                    call("ibq_backward", torch.ones_like(q), d_avg, d_ps, d_quant, *rest)


def _sampling(call, device: torch.device) -> None:
    """The sampling variants of every kl_mode in one and many programs (run with seeds read from device memory)."""
    for shape in [(3, 50), (20, 1000)]:
        mu, lv = (torch.randn(shape, generator=torch.Generator().manual_seed(i)).to(device) for i in range(2))
        for mode in ["none", "elementwise", "sum", "latent", "sample"]:
            _gaussian_step(call, mu, lv, (None, None), philox.draw_seed(mu.device), mode)


def _wide(call, device: torch.device) -> None:
    """The kernels with an int64-offset variant: the Gaussian backward (each weight shape; two programs) and the
    search."""
    mu = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0)).to(device)
    seed = philox.draw_seed(mu.device)
    for mode in ["elementwise", "sum", "latent", "sample"]:
        _gaussian_step(call, mu, mu, (None, None), seed, mode)
    z, cb = _near_codes((2, 96, 5, 7), 1, 40, torch.float32, device)
    for precision in ["exact", "tf32", "bf16"]:
        call("vq_forward", z, cb, 1, precision, True)


def _near_codes(shape, dim, k, dtype, device, noise=0.1):
    """z of `shape` whose rows (along `dim`) lie near random codes, and the (K, D) codebook: each row's nearest code
    stands clear of the others, so every precision finds the reference's index."""
    g = torch.Generator().manual_seed(k)
    d = shape[dim]
    cb = torch.randn(k, d, generator=g)
    rows_shape = shape[:dim] + shape[dim + 1:]
    rows = cb[torch.randint(0, k, rows_shape, generator=g)] + noise * torch.randn(*rows_shape, d, generator=g)
    return rows.movedim(-1, dim).contiguous().to(device, dtype), cb.to(device, dtype)


@contextlib.contextmanager
def _int64_offsets():
    """Triton's int64-offset variants from any size, not only from 2**31 elements (other backends: no change)."""
    from vaekernels.triton import _common

    before = _common.WIDE_OFFSETS
    _common.WIDE_OFFSETS = 0
    _flags.append("int64 offsets")
    try:
        yield
    finally:
        _common.WIDE_OFFSETS = before
        _flags.remove("int64 offsets")


@contextlib.contextmanager
def _device_seeds(device: torch.device):
    """Triton kernels read the seed from device memory, as under torch.compile and CUDA-graph capture (eager calls
    pass its value; other backends: no change)."""
    from vaekernels.triton import _common

    before = _common.seed_arg
    _common.seed_arg = lambda seed: (seed.to(device), False)
    _flags.append("device seeds")
    try:
        yield
    finally:
        _common.seed_arg = before
        _flags.remove("device seeds")


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """torch.use_deterministic_algorithms as a context; warn_only keeps cuBLAS (torch backend) usable without
    CUBLAS_WORKSPACE_CONFIG, and vaekernels reads are_deterministic_algorithms_enabled(), which is True either way."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)
