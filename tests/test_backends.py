"""Every fused backend against the reference backend, forward and backward.

On a CPU-only machine this runs the Triton kernels through Triton's interpreter (the twin of the GPU run);
with a GPU it runs the compiled Triton kernels and the CUDA extension on CUDA tensors.
"""
import pytest
import torch

import vaekernels as vk
from vaekernels.ops.vq import quantize_with_stats
from vaekernels.reference import philox

try:
    from vaekernels.triton import vq as tvq
except ImportError:  # triton is not installed: the Triton tests skip
    tvq = None

from .conftest import DEVICE, FUSED_BACKENDS, HAS_CUDA, assert_close, philox_reference

pytestmark = pytest.mark.skipif(not FUSED_BACKENDS, reason="no fused backend available (install triton)")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run_both(backend, fn):
    with vk.use_backend("torch"), philox_reference():
        expected = fn()
    with vk.use_backend(backend):
        actual = fn()
    return actual, expected


def _tensor(shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g)).to(DEVICE, dtype).requires_grad_()


def _assert_vq_like_reference(backend, z, cb, dtype=torch.float32, w=None, **kwargs):
    """quantize_with_stats on `backend` against the reference: equal indices and counts; close quantized rows,
    loss, perplexity, EMA sums and the gradients of the loss (plus <quantized, w> when `w` is given)."""

    def run():
        r, counts, sums, _ = quantize_with_stats(z, cb, with_sums=True, **kwargs)
        loss = r.loss.float() + ((r.quantized.float() * w).sum() if w is not None else 0.0)
        return (r.quantized, r.loss, r.perplexity, sums) + torch.autograd.grad(loss, (z, cb)), r.indices, counts

    (a, ia, ca), (e, ie, ce) = _run_both(backend, run)
    assert torch.equal(ia, ie) and torch.equal(ca, ce)
    for x, y in zip(a, e):
        assert_close(x, y, dtype, scale=5)


# shapes hit: one tile, many tiles with tails, the multi-program partial sums (> 16384 elements), long thin
@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5), (70, 257), (3000, 7), (1, 20001)])
@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean", "per_sample"])
def test_gaussian_parity(backend, shape, reduction):
    mu, lv = _tensor(shape, torch.float32, 0), _tensor(shape, torch.float32, 1, 0.5)
    pmu, plv = _tensor(shape, torch.float32, 2), _tensor(shape, torch.float32, 3, 0.5)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)

    def run():
        kl = vk.gaussian_kl(mu, lv, pmu, plv, reduction=reduction)
        torch.manual_seed(9)
        z, kl2 = vk.reparameterize_kl(mu, lv, reduction=reduction)
        loss = kl.sum() + (z * w).sum() + kl2.sum()
        return (kl, z, kl2) + torch.autograd.grad(loss, (mu, lv, pmu, plv))

    for a, e in zip(*_run_both(backend, run)):
        assert_close(a, e, scale=10)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_dtypes_and_free_bits(backend, dtype):
    mu, lv = _tensor((37, 300), dtype, 0), _tensor((37, 300), dtype, 1, 0.5)

    def run():
        torch.manual_seed(3)
        z, kl = vk.reparameterize_kl(mu, lv, free_bits=0.5)
        kl2 = vk.gaussian_kl(mu, lv, reduction="none")
        return (z, kl, kl2) + torch.autograd.grad(z.float().pow(2).sum() + kl.float() + kl2.float().sum(), (mu, lv))

    for a, e in zip(*_run_both(backend, run)):
        assert a.dtype == e.dtype
        assert_close(a, e, dtype, scale=5)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_samples_follow_the_philox_stream(backend):
    """The kernel's eps is tl.randn(seed, flat index): element by element equal to the tensor Philox."""
    mu, lv = torch.zeros(3, 1500, device=DEVICE), torch.zeros(3, 1500, device=DEVICE)
    with vk.use_backend(backend):
        torch.manual_seed(21)
        z = vk.reparameterize(mu, lv)
    torch.manual_seed(21)
    seed = philox.draw_seed(mu.device)
    torch.testing.assert_close(z.cpu(), philox.randn(seed, mu.numel()).view(mu.shape), atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_kl_is_bitwise_deterministic(backend):
    mu, lv = _tensor((300, 129), torch.float32, 0), _tensor((300, 129), torch.float32, 1)
    with vk.use_backend(backend):
        first = [vk.gaussian_kl(mu, lv, reduction=r) for r in ("sum", "per_sample", "batchmean")]
        second = [vk.gaussian_kl(mu, lv, reduction=r) for r in ("sum", "per_sample", "batchmean")]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# what a step may do besides launching kernels: allocate, read the host-side seed (int(seed): on CUDA tensors a CPU
# tensor, see test_gaussian's test_cuda_seed_is_drawn_on_the_host_from_the_cuda_generator), draw that seed (on CPU
# tensors with torch.randint; CUDA tensors take it from the generator's Philox state without a launch) and hand
# autograd its gradients
_NO_KERNEL = {"aten::empty", "aten::empty_like", "aten::empty_strided", "aten::new_empty", "aten::item",
              "aten::_local_scalar_dense", "aten::detach", "aten::randint", "aten::random_"}


def _kernels(monkeypatch, step) -> tuple[list[str], list[str]]:
    """(kernels, other ATen ops) of one call of `step`: on a GPU every CUDA kernel (torch.profiler); on the CPU the
    Triton launches (the interpreter's, recorded instead of run: only the count matters here) and every ATen op
    the profiler sees that would launch a kernel on a GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if HAS_CUDA:
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        return [e.name for e in prof.events() if e.device_type == DeviceType.CUDA], []
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    monkeypatch.setattr(InterpretedFunction, "run", lambda self, *a, **k: launches.append(self.fn.__name__))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return launches, [e.name for e in prof.events() if e.name.startswith("aten::") and e.name not in _NO_KERNEL]


@pytest.mark.skipif(tvq is None, reason="triton is not installed")
def test_reparameterize_kl_step_is_two_kernel_launches(monkeypatch):
    """The GPU launch budget: reparameterize_kl forward+backward at 64x128 on the Triton backend launches two
    kernels (the fused forward and the fused backward) and nothing else; on the CPU, the interpreter twin."""
    mu, lv = _tensor((64, 128), torch.float32, 0), _tensor((64, 128), torch.float32, 1)
    grads = (torch.ones_like(mu), torch.ones((), device=DEVICE))

    def step():
        mu.grad = lv.grad = None  # accumulating into existing gradients would add a kernel of autograd's own
        torch.autograd.backward(vk.reparameterize_kl(mu, lv), grads)

    with vk.use_backend("triton"):
        step()  # compile and warm up outside the count
        kernels, aten = _kernels(monkeypatch, step)
    assert len(kernels) == 2 and aten == [], (kernels, aten)
    if not HAS_CUDA:
        assert kernels == ["_forward_kernel", "_backward_kernel"]


@pytest.mark.skipif(tvq is None, reason="triton is not installed")
@pytest.mark.parametrize("op", ["nearest_code", "vector_quantize"])
def test_search_fills_only_what_it_accumulates(monkeypatch, op):
    """The Triton search zero-fills only the outputs its launches accumulate into (vector_quantize's per-code
    counts; each program writes its own squared-error partial); nearest_code writes indices only, so it fills nothing."""
    z, cb = torch.randn(50, 8, device=DEVICE), torch.randn(40, 8, device=DEVICE)
    with vk.use_backend("triton"), torch.no_grad():
        getattr(vk, op)(z, cb)
        kernels, aten = _kernels(monkeypatch, lambda: getattr(vk, op)(z, cb))
    fills = [n for n in kernels if "Fill" in n] + [n for n in aten if n == "aten::zeros"]  # GPU kernels, CPU calls
    assert len(fills) == (0 if op == "nearest_code" else 1), (kernels, aten)


VQ_CASES = [  # (shape, dim, K): tails in N, K and D; channel-first; D over one tile; D = 1
    ((37, 5), -1, 7),
    ((3, 6, 5, 4), 1, 33),
    ((50, 70), -1, 40),
    ((2, 3, 4, 130), -1, 17),
    ((9, 1), -1, 3),
]


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("shape, dim, k, estimator", [c + (e,) for c in VQ_CASES for e in ("ste", "rotation")
                                                       if not (e == "rotation" and c[0][c[1]] == 1)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_vq_parity(backend, shape, dim, k, estimator, dtype):
    """(D = 1 with "rotation" is left out: a code of the other sign is antiparallel to z, where the rotation is
    singular and float32 rounding decides the result.)"""
    z = _tensor(shape, dtype, 0)
    cb = _tensor((k, shape[dim]), dtype, 1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    _assert_vq_like_reference(backend, z, cb, dtype, w, dim=dim, estimator=estimator, beta=0.3)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("n, k, d", [(70, 300, 1024), (257, 1025, 3)])
def test_nearest_code_large_d_and_k(backend, n, k, d):
    g = torch.Generator().manual_seed(0)
    z, cb = torch.randn(n, d, generator=g).to(DEVICE), torch.randn(k, d, generator=g).to(DEVICE)
    with vk.use_backend(backend):
        idx = vk.nearest_code(z, cb)
    assert torch.equal(idx.cpu(), torch.cdist(z.double().cpu(), cb.double().cpu()).argmin(1))


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton is not available")
@pytest.mark.parametrize("config", range(len(tvq.SEARCH_CONFIGS) if tvq else 1))
@pytest.mark.parametrize("precision", ["exact", "tf32"])
def test_every_search_config(monkeypatch, config, precision):
    """Each tile shape the GPU autotuner may pick gives the reference's results (the suite itself runs one
    config: VAEKERNELS_AUTOTUNE=0), with tails in N, K and D and D looped over several tiles."""
    monkeypatch.setattr(tvq._search_kernel, "configs", [tvq.SEARCH_CONFIGS[config]])
    monkeypatch.setattr(tvq._search_kernel, "cache", {})
    g = torch.Generator().manual_seed(config)
    cb = torch.randn(150, 70, generator=g)
    z = cb[torch.randint(0, 150, (133,), generator=g)] + 0.05 * torch.randn(133, 70, generator=g)
    z, cb = z.to(DEVICE).requires_grad_(), cb.to(DEVICE).requires_grad_()
    _assert_vq_like_reference("triton", z, cb, precision=precision)


@pytest.mark.skipif("triton" not in FUSED_BACKENDS, reason="triton is not available")
def test_int64_offset_variants(monkeypatch):
    """The kernels' int64-offset variants (taken from 2**31 elements, too large to test at that size) give the
    reference's results: the search with channel-first rows, D looped and in one tile, and the Gaussian backward
    (same Philox draws as the forward, per-latent and per-sample weights)."""
    monkeypatch.setattr(tvq._common, "WIDE_OFFSETS", 0)
    for d in (5, 40):
        z, cb = _tensor((2, d, 7, 3), torch.float32, d), _tensor((37, d), torch.float32, d + 1)
        _assert_vq_like_reference("triton", z, cb, dim=1, precision="tf32")
    mu, lv = _tensor((6, 333), torch.float32, 0), _tensor((6, 333), torch.float32, 1, 0.5)
    for reduction in ("per_sample", "none"):

        def run():
            torch.manual_seed(5)
            z, kl = vk.reparameterize_kl(mu, lv, reduction=reduction)
            return (z, kl) + torch.autograd.grad((z * z).sum() + kl.sum() if kl.dim() else kl, (mu, lv))

        for a, e in zip(*_run_both("triton", run)):
            assert_close(a, e, scale=10)


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_vq_nan_rows(backend):
    z = _tensor((20, 6), torch.float32, 0).detach()
    z[4, 3] = float("nan")
    cb = _tensor((9, 6), torch.float32, 1)
    with vk.use_backend(backend):
        r, counts, sums, _ = quantize_with_stats(z, cb, with_sums=True)
        idx = vk.nearest_code(z, cb)
    assert idx[4].item() == -1 and r.indices[4].item() == -1
    assert torch.isnan(r.quantized[4]).all() and torch.isnan(r.loss) and counts.sum().item() == 19


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fast_precision_on_separated_codes(backend, precision):
    g = torch.Generator().manual_seed(0)
    cb = torch.randn(300, 64, generator=g)
    z = cb[torch.randint(0, 300, (500,), generator=g)] + 0.05 * torch.randn(500, 64, generator=g)
    z, cb = z.to(DEVICE), cb.to(DEVICE)
    with vk.use_backend(backend):
        assert torch.equal(vk.nearest_code(z, cb, precision=precision), vk.nearest_code(z, cb))


@pytest.mark.parametrize("backend", FUSED_BACKENDS)
def test_deterministic_mode_scatters(backend):
    z = _tensor((400, 9), torch.float32, 0)
    cb = _tensor((13, 9), torch.float32, 1)
    torch.use_deterministic_algorithms(True)

    def run():
        r, _, sums, _ = quantize_with_stats(z, cb, with_sums=True)
        return (sums,) + torch.autograd.grad(r.loss, (z, cb))

    with vk.use_backend(backend):
        first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for a, e in zip(first, _run_both("torch", run)[1]):
        assert_close(a, e)
