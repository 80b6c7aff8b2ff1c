"""The CUDA C++ backend (vaekernels._C via vaekernels.cuda).

CPU tests (always run): the extension builds and reports its architectures, the Philox stream and the row-layout
logic match the reference, errors carry the op name, and without a GPU the backend reports itself unavailable while
"auto" falls back to PyTorch. GPU tests (marked gpu): parity of every op, forward and backward, with the PyTorch
backend across dtypes, odd sizes and layouts; exact indices; determinism; fast precision modes.
VAEKERNELS_TEST_QUICK=1 shrinks the GPU sizes (bench/gpu_check.sh sets it under compute-sanitizer).
"""
from __future__ import annotations

import os
import re
import shutil

import pytest
import torch

import vaekernels as vk
from vaekernels import _backend
from vaekernels import cuda as vk_cuda
from vaekernels.ops.vq import quantize_with_stats
from vaekernels.reference import philox
from vaekernels.reference.vq import rows

from .kernel_variants import deterministic

try:
    from vaekernels import _C
except ImportError as e:
    _C, _C_ERROR = None, str(e)


def _nvcc_found() -> bool:
    home = os.environ.get("CUDA_HOME")
    return bool((home and os.path.exists(os.path.join(home, "bin", "nvcc"))) or shutil.which("nvcc")
                or os.path.exists("/usr/local/cuda/bin/nvcc"))


needs_ext = pytest.mark.skipif(_C is None, reason="vaekernels._C is not built (no nvcc at install time)")
CUDA_OK, CUDA_WHY = _backend.availability("cuda")


def gpu_test(fn):
    """Marks a test `gpu`; skipped where no CUDA device is visible, and where the backend cannot run on the device
    (then test_cuda_backend_available fails once with the reason instead of every test failing alike)."""
    unusable = torch.cuda.is_available() and not CUDA_OK
    fn = pytest.mark.skipif(unusable, reason=f"cuda backend unavailable: {CUDA_WHY}")(fn)
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(fn))


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


# ------------------------------------------------------------------------------------------------ CPU tests


def test_extension_built_and_reports_architectures():
    if _C is None:
        if _nvcc_found() and os.environ.get("VAEKERNELS_NO_CUDA", "0") in ("", "0"):
            pytest.fail(f"nvcc is installed but vaekernels._C is missing ({_C_ERROR}): reinstall with "
                        "`pip install --no-build-isolation --no-deps -e .`")
        pytest.skip("no nvcc on this machine (or VAEKERNELS_NO_CUDA set): the extension is not built")
    info = vk_cuda.build_info()
    assert info["built"] is True
    assert info["archs"] and all(isinstance(a, int) and a >= 80 for a in info["archs"]), info
    assert info["ptx"] == max(info["archs"])
    assert re.fullmatch(r"\d+\.\d+", info["cuda"]), info
    assert info["cudart"] == "static"


def test_build_info_without_extension(monkeypatch):
    def missing():
        raise ImportError("No module named 'vaekernels._C'")

    monkeypatch.setattr(vk_cuda, "_ext", missing)
    info = vk_cuda.build_info()
    assert info["built"] is False and "not built" in info["reason"]


@needs_ext
def test_philox_stream_matches_reference():
    """The kernels' Philox code (run on the host) gives tl.randn's words exactly, across the 2**32 offset boundary."""
    n = 3000
    for seed, offset in [(0, 0), (2**61 + 12345, 2**32 - 1500), (2**62 - 1, 7)]:
        words = torch.empty(2 * n, dtype=torch.int32)
        normals = torch.empty(n, dtype=torch.float32)
        _C.philox_host(seed, offset, n, words.data_ptr(), normals.data_ptr())
        w0, w1 = philox.philox_uint32x2(seed, torch.arange(offset, offset + n, dtype=torch.int64))
        words = words.to(torch.int64) & 0xFFFFFFFF
        assert torch.equal(words[0::2], w0) and torch.equal(words[1::2], w1)
        if offset == 0:
            torch.testing.assert_close(normals, philox.randn(seed, n), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make, dim, copied", [
    (lambda: torch.randn(2, 5, 3, 4), 1, False),                                   # channel-first NCHW
    (lambda: torch.randn(2, 5, 3, 4), 3, False),                                   # channel-last
    (lambda: torch.randn(2, 5, 3, 4), 0, False),
    (lambda: torch.randn(2, 5, 3, 4).contiguous(memory_format=torch.channels_last), 1, False),
    (lambda: torch.randn(2, 5, 3, 4).permute(0, 2, 3, 1), 3, False),
    (lambda: torch.randn(2, 5, 3, 4)[:, :, 1:, ::2], 1, False),
    (lambda: torch.randn(2, 5, 3, 4).transpose(0, 2), 2, True),
    (lambda: torch.randn(7).expand(3, 7), 1, False),
    (lambda: torch.randn(6), 0, False),
])
def test_row_layout_addresses_every_element(make, dim, copied):
    """cuda._layout describes rows(t, dim) through strides, copying only layouts that need it."""
    t = make()
    ts, (inner, s_outer, s_inner, s_d) = vk_cuda._layout(t, dim)
    assert (ts is not t) == copied
    d = t.shape[dim]
    n = torch.arange(t.numel() // d)
    offsets = ((n // inner) * s_outer + (n % inner) * s_inner)[:, None] + torch.arange(d)[None] * s_d
    storage = ts.as_strided((ts.untyped_storage().nbytes() // ts.element_size(),), (1,), 0)
    assert torch.equal(storage[offsets + ts.storage_offset()], rows(t, dim))


@needs_ext
def test_errors_carry_op_name_and_cuda_message():
    """A failing call raises RuntimeError("vaekernels._C.<op>: <CUDA error>") and leaves the backend usable."""
    bad = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(RuntimeError, match=r"^vaekernels\._C\.gaussian_forward: .+") as info:
        _C.gaussian_forward(bad, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 2, 0, 1.0, 0, 0)
    with pytest.raises(RuntimeError, match=r"^vaekernels\._C\.vq_forward: .+"):
        _C.vq_search(bad, 0, 0, 0, (1, 1, 0, 1), 1, 1, 0, 0, 1, 0, 0, 8, (1, 1, 0, 1), 0, 0, 0, 0, 0)
    if torch.cuda.is_available():
        assert "invalid device ordinal" in str(info.value)
        mu = torch.randn(5, device="cuda")
        with vk.use_backend("cuda"):
            assert torch.isfinite(vk.gaussian_kl(mu, mu)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_unavailable_without_gpu_and_auto_falls_back():
    ok, reason = _backend.availability("cuda")
    assert not ok
    assert ("no CUDA device" in reason) if _C is not None else ("not built" in reason)
    previous = vk.get_backend()
    with pytest.raises(RuntimeError, match=re.escape(reason)):
        vk.set_backend("cuda")
    assert vk.get_backend() == previous
    mu, logvar = torch.randn(4, 6), torch.randn(4, 6)
    z, codebook = torch.randn(4, 3, 5, 5), torch.randn(10, 3)
    with vk.use_backend("auto"):
        kl_auto = vk.gaussian_kl(mu, logvar, reduction="per_sample")
        vq_auto = vk.vector_quantize(z, codebook, dim=1)
        assert _backend.implementation("vq_fwd", mu.device).__name__ == "vaekernels.reference"
    with vk.use_backend("torch"):
        assert torch.equal(kl_auto, vk.gaussian_kl(mu, logvar, reduction="per_sample"))
        assert torch.equal(vq_auto.indices, vk.vector_quantize(z, codebook, dim=1).indices)


# ------------------------------------------------------------------------------------------------ GPU helpers


def both(fn):
    """fn() under the cuda backend and under the torch backend."""
    with vk.use_backend("cuda"):
        got = fn()
    with vk.use_backend("torch"):
        want = fn()
    return got, want


def assert_close(got, want, dtype, what=""):
    if want is None:
        assert got is None, what
        return
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    tol = TOL[dtype]
    scale = max(1.0, want.float().abs().max().item()) if want.numel() else 1.0
    torch.testing.assert_close(got.float(), want.float(), rtol=tol["rtol"], atol=tol["atol"] * scale, msg=what,
                               equal_nan=True)


def grads(fn, *inputs, seed=None):
    """Outputs of fn(*leaves) and the gradients of the leaves for fixed random output gradients."""
    leaves = [None if t is None else t.detach().clone().requires_grad_(True) for t in inputs]
    if seed is not None:
        torch.manual_seed(seed)
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    diff = [o for o in outs if o.requires_grad]
    upstream = [torch.randn(o.shape, generator=gen, device="cuda").to(o.dtype) for o in diff]
    torch.autograd.backward(diff, upstream)
    return [o.detach() for o in outs], [None if t is None else t.grad for t in leaves]


def quarter_data(n_rows_shape, k, d, dtype, cb_dtype=None, seed=0):
    """z on a 1/8 grid and an integer codebook: every float32 distance is exact, so any correct kernel finds
    exactly the float64 argmin (lowest index on exact ties) and backends must agree index for index."""
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randint(-16, 16, n_rows_shape, generator=gen) / 4 + 0.125).to(dtype).cuda()
    cb = torch.randint(-4, 4, (k, d), generator=gen).to(cb_dtype or dtype).cuda()
    return z, cb


def sq_dist64(zr, cb):
    """Squared distances in float64 (exact for quarter_data)."""
    zr, cb = zr.double(), cb.double()
    return (zr * zr).sum(1, keepdim=True) + (cb * cb).sum(1) - 2.0 * zr @ cb.t()




def channel_first_shape(n, d):
    """(B, D, H, W) with B * H * W = n."""
    for b in (10, 7, 1):
        if n % b == 0:
            rest = n // b
            h = next(h for h in (10, 1) if rest % h == 0)
            return (b, d, h, rest // h)


QUICK = os.environ.get("VAEKERNELS_TEST_QUICK", "0") not in ("", "0")
if QUICK:
    VQ_SIZES = [(1, 1, 1), (7, 5, 3), (100, 70, 8), (70, 130, 64), (33, 5, 257)]
    GAUSS_SHAPES = [(1,), (7, 3), (3, 4, 7, 9)]
    N_BIG, K_BIG = 300, 130
else:
    VQ_SIZES = [(1, 1, 1), (7, 5, 3), (1000, 300, 8), (4099, 1025, 64), (1000, 5, 257), (7, 1025, 1024),
                (4099, 300, 3), (1, 300, 1024), (1000, 1025, 1)]
    GAUSS_SHAPES = [(1,), (7, 3), (1000, 5), (4099,), (3, 4, 7, 9), (16, 4, 33, 33)]
    N_BIG, K_BIG = 4099, 1025


# ------------------------------------------------------------------------------------------------ Gaussian (GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_backend_available():
    assert CUDA_OK, CUDA_WHY
    vk.set_backend("cuda")
    assert vk.get_backend() == "cuda"


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GAUSS_SHAPES)
@pytest.mark.parametrize("reduction, free_bits", [("none", 0.0), ("sum", 0.0), ("mean", 0.0), ("batchmean", 0.0),
                                                  ("per_sample", 0.0), ("batchmean", 0.05)])
@pytest.mark.parametrize("prior", [False, True])
@pytest.mark.parametrize("misaligned", [False, True])
def test_gaussian_kl_parity(dtype, shape, reduction, free_bits, prior, misaligned):
    n = torch.Size(shape).numel()
    mu = torch.randn(n + 1, device="cuda").to(dtype)[int(misaligned):n + int(misaligned)].view(shape)  # not 16-byte aligned
    logvar = (0.5 * torch.randn(shape, device="cuda")).to(dtype)
    pm = (0.3 * torch.randn(shape[-1:], device="cuda")).to(dtype) if prior else None
    plv = (0.2 * torch.randn(shape, device="cuda")).to(dtype) if prior else None

    def run():
        return grads(lambda m, v, a, b: vk.gaussian_kl(m, v, a, b, reduction=reduction, free_bits=free_bits),
                     mu, logvar, pm, plv)

    (outs, gs), (outs_ref, gs_ref) = both(run)
    assert_close(outs[0], outs_ref[0], dtype, "kl")
    for name, g, g_ref in zip(("mu", "logvar", "prior_mu", "prior_logvar"), gs, gs_ref):
        assert_close(g, g_ref, dtype, "d" + name)


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GAUSS_SHAPES)
@pytest.mark.parametrize("reduction, free_bits", [("batchmean", 0.0), ("per_sample", 0.0), ("batchmean", 0.05),
                                                  ("none", 0.0)])
def test_reparameterize_kl_parity(dtype, shape, reduction, free_bits):
    mu = torch.randn(shape, device="cuda").to(dtype)
    logvar = (0.5 * torch.randn(shape, device="cuda")).to(dtype)

    def run():
        return grads(lambda m, v: vk.reparameterize_kl(m, v, reduction=reduction, free_bits=free_bits), mu, logvar,
                     seed=7)

    (outs, gs), (outs_ref, gs_ref) = both(run)
    assert_close(outs[0], outs_ref[0], dtype, "z")
    assert_close(outs[1], outs_ref[1], dtype, "kl")
    assert_close(gs[0], gs_ref[0], dtype, "dmu")
    assert_close(gs[1], gs_ref[1], dtype, "dlogvar")


@gpu_test
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", GAUSS_SHAPES + [(64, 4, 32, 32)])
def test_reparameterize_same_seed_as_reference(dtype, shape):
    """Same seed, same eps: z matches the reference within 1e-6 (float32) and the backward regenerates eps."""
    mu = torch.randn(shape, device="cuda").to(dtype)
    logvar = torch.randn(shape, device="cuda").to(dtype)
    (outs, gs), (outs_ref, gs_ref) = both(lambda: grads(vk.reparameterize, mu, logvar, seed=11))
    if dtype == torch.float32:
        torch.testing.assert_close(outs[0], outs_ref[0], rtol=1e-6, atol=1e-6)
    else:
        assert_close(outs[0], outs_ref[0], dtype, "z")
    assert_close(gs[1], gs_ref[1], dtype, "dlogvar")
    assert torch.equal(gs[0], gs_ref[0])  # dmu is dz itself
    zero = torch.zeros(shape, device="cuda")
    with vk.use_backend("cuda"):
        torch.manual_seed(5)
        eps = vk.reparameterize(zero, zero)
    torch.manual_seed(5)
    seed = philox.draw_seed(torch.device("cuda"))
    torch.testing.assert_close(eps, philox.randn(seed, zero.numel(), device="cuda").view(shape), rtol=1e-6,
                               atol=1e-6)


@gpu_test
def test_gaussian_float64_runs_on_reference():
    mu = torch.randn(5, 3, device="cuda", dtype=torch.float64)
    (outs, gs), (outs_ref, gs_ref) = both(lambda: grads(lambda m: vk.gaussian_kl(m, m), mu))
    assert torch.equal(outs[0], outs_ref[0]) and torch.equal(gs[0], gs_ref[0])


# ------------------------------------------------------------------------------------------------ VQ (GPU)


@gpu_test
@pytest.mark.parametrize("n, k, d", VQ_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["last", "first"])
def test_nearest_code_exact_indices(n, k, d, dtype, layout):
    shape = (n, d) if layout == "last" else channel_first_shape(n, d)
    dim = -1 if layout == "last" else 1
    z, cb = quarter_data(shape, k, d, dtype)
    got, want = both(lambda: vk.nearest_code(z, cb, dim=dim))
    assert got.shape == want.shape and torch.equal(got, want)
    dist = sq_dist64(rows(z, dim), cb)
    first_min = (dist == dist.min(1, keepdim=True).values).int().argmax(1)
    assert torch.equal(got.reshape(-1), first_min)


@gpu_test
@pytest.mark.parametrize("d", [3, 64, 257])
def test_nearest_code_random_data_matches_float64(d):
    """On random float32 data indices equal the float64 argmin except where two distances tie in float32."""
    z, cb = torch.randn(N_BIG, d, device="cuda"), torch.randn(K_BIG, d, device="cuda")
    with vk.use_backend("cuda"):
        got = vk.nearest_code(z, cb)
    dist = sq_dist64(z, cb)
    best = dist.min(1).values
    chosen = dist.gather(1, got[:, None]).squeeze(1)
    assert torch.all(chosen <= best + 1e-5 * (1 + best)), (chosen - best).max()
    assert (got == dist.argmin(1)).float().mean() > 0.999


@gpu_test
def test_nearest_code_ties_and_nan_rows():
    cb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]], device="cuda")
    z = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [float("nan"), 0.0], [3.0, 3.0]], device="cuda")
    for precision in ("exact", "tf32", "bf16"):
        with vk.use_backend("cuda"):
            got = vk.nearest_code(z, cb, precision=precision)
        assert got.tolist() == [0, 1, 0, -1, 0], precision
    with vk.use_backend("cuda"):
        q = vk.vector_quantize(z, cb)
    assert torch.isnan(q.quantized[3]).all() and torch.isnan(q.loss)


@gpu_test
@pytest.mark.parametrize("d", [64, 257, 1024])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_fast_precisions_equal_exact_on_separated_data(d, precision):
    gen = torch.Generator(device="cuda").manual_seed(d)
    cb = torch.randn(K_BIG, d, device="cuda", generator=gen)
    truth = torch.randint(0, K_BIG, (N_BIG,), device="cuda", generator=gen)
    z = cb[truth] + 0.05 * torch.randn(N_BIG, d, device="cuda", generator=gen)
    zc = z.t().reshape(1, d, N_BIG)  # channel-first rows read through strides
    with vk.use_backend("cuda"):
        exact = vk.nearest_code(z, cb)
        fast = vk.nearest_code(z, cb, precision=precision)
        fast_cf = vk.nearest_code(zc, cb, dim=1, precision=precision)
    assert torch.equal(exact, truth) and torch.equal(fast, exact) and torch.equal(fast_cf.reshape(-1), exact)


@gpu_test
@pytest.mark.parametrize("n, k, d", VQ_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["last", "first"])
@pytest.mark.parametrize("estimator", ["ste", "rotation"])
def test_vector_quantize_parity(n, k, d, dtype, layout, estimator):
    shape = (n, d) if layout == "last" else channel_first_shape(n, d)
    dim = -1 if layout == "last" else 1
    z, cb = quarter_data(shape, k, d, dtype, seed=n + k + d)

    def run():
        def fn(zz, cc):
            r = vk.vector_quantize(zz, cc, dim=dim, estimator=estimator, beta=0.3)
            return r.quantized, r.loss, r.codebook_loss, r.commitment_loss, r.perplexity, r.indices

        return grads(fn, z, cb)

    (outs, gs), (outs_ref, gs_ref) = both(run)
    assert torch.equal(outs[5], outs_ref[5])
    assert_close(outs[0], outs_ref[0], dtype, "quantized")
    for i, name in enumerate(("loss", "codebook_loss", "commitment_loss", "perplexity"), start=1):
        torch.testing.assert_close(outs[i].float(), outs_ref[i].float(), rtol=1e-4 if dtype == torch.float32
                                   else TOL[dtype]["rtol"], atol=1e-6, msg=name)
    rot = 10.0 if estimator == "rotation" else 1.0  # the rotation map amplifies rounding differences
    tol = {key: value * rot for key, value in TOL[dtype].items()}
    torch.testing.assert_close(gs[0].float(), gs_ref[0].float(), **tol, msg="dz")
    assert_close(gs[1], gs_ref[1], dtype, "dcodebook")


@gpu_test
@pytest.mark.parametrize("z_dtype, cb_dtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                                               (torch.float32, torch.float16)])
def test_vector_quantize_mixed_dtypes(z_dtype, cb_dtype):
    z, cb = quarter_data((1000, 64), 300, 64, z_dtype, cb_dtype)
    (outs, gs), (outs_ref, gs_ref) = both(lambda: grads(lambda a, b: tuple(vk.vector_quantize(a, b)[:3]), z, cb))
    assert torch.equal(outs[1], outs_ref[1])
    assert outs[0].dtype == z_dtype and outs[2].dtype == torch.promote_types(z_dtype, cb_dtype)
    assert_close(outs[0], outs_ref[0], z_dtype, "quantized")
    torch.testing.assert_close(outs[2], outs_ref[2], rtol=1e-4, atol=1e-6)
    assert_close(gs[0], gs_ref[0], z_dtype, "dz")
    assert_close(gs[1], gs_ref[1], cb_dtype, "dcodebook")


@gpu_test
def test_vector_quantize_noncontiguous_input_and_float64():
    z, cb = quarter_data((8, 6, 16), 40, 16, torch.float32)
    zt = z.transpose(0, 1)  # (6, 8, 16): rows that fit no strided layout
    (outs, gs), (outs_ref, gs_ref) = both(lambda: grads(lambda a, b: tuple(vk.vector_quantize(a, b)[:2]), zt, cb))
    assert torch.equal(outs[1], outs_ref[1])
    assert_close(gs[0], gs_ref[0], torch.float32, "dz")
    z64, cb64 = z.double(), cb.double()
    (outs, _), (outs_ref, _) = both(lambda: grads(lambda a, b: tuple(vk.vector_quantize(a, b)[:3]), z64, cb64))
    assert all(torch.equal(a, b) for a, b in zip(outs, outs_ref))


@gpu_test
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("layout", ["last", "first"])
def test_ema_statistics_and_codebook_gradient(det, layout):
    """Per-code counts and sums, and the codebook gradient, with float atomics and in deterministic mode; a third
    of the rows go to one code (duplicated codes resolve to the lowest), so its segment crosses many chunks."""
    gen = torch.Generator().manual_seed(3)
    cb = torch.randint(-4, 4, (300, 64), generator=gen).float()
    cb[:5] = 0.125
    truth = torch.randint(0, 300, (3927,), generator=gen)
    truth[::3] = 2
    zr = (cb[truth] + torch.randint(-1, 2, (3927, 64), generator=gen) / 8).half()
    z = zr if layout == "last" else zr.view(7, 17, 33, 64).permute(0, 3, 1, 2).contiguous()
    dim = -1 if layout == "last" else 1
    z, cb = z.cuda(), cb.cuda()

    def run():
        with deterministic(det):
            _, counts, sums, _ = quantize_with_stats(z, cb, dim=dim, with_sums=True)
            _, (_, dcb) = grads(lambda a, b: vk.vector_quantize(a, b, dim=dim).loss, z, cb)
        return counts, sums, dcb

    (counts, sums, dcb), (counts_ref, sums_ref, dcb_ref) = both(run)
    assert counts.dtype == torch.int64 and torch.equal(counts, counts_ref) and counts[0] > 1300
    assert sums.dtype == torch.float32
    torch.testing.assert_close(sums, sums_ref, rtol=1e-5, atol=1e-3)
    assert_close(dcb, dcb_ref, torch.float32, "dcodebook")


@gpu_test
def test_deterministic_mode_is_bitwise_reproducible():
    z, cb = quarter_data((7, 64, 17, 33), 300, 64, torch.float32)
    z = z + 0.01 * torch.randn_like(z)  # inexact sums: atomics would reorder them
    mu = torch.randn(64, 4, 33, 33, device="cuda")

    def run():
        def fn(zz, cc, m):
            r = vk.vector_quantize(zz, cc, dim=1, estimator="rotation")
            return r.loss, vk.gaussian_kl(m, 0.5 * m, reduction="per_sample"), vk.gaussian_kl(m, m, free_bits=0.1)

        outs, gs = grads(fn, z, cb, mu)
        stats = quantize_with_stats(z, cb, dim=1, with_sums=True)
        return outs + gs + [stats[1], stats[2]]

    with deterministic(True), vk.use_backend("cuda"):
        first, second = run(), run()
    assert len(first) == 8 and all(torch.equal(a, b) for a, b in zip(first, second))
