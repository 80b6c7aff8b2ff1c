"""vk.lookup_free_quantize (LFQ / BSQ with the exact entropy terms) against the dense tokens x 2^K formula."""
import subprocess
import sys
import textwrap

import pytest
import torch

import vaekernels as vk
from vaekernels import _backend
from vaekernels.ops import lfq as lops
from vaekernels.reference import lfq as ref

from .conftest import DEVICE, FUSED_BACKENDS, gpu

LFQ_BACKENDS = [b for b in FUSED_BACKENDS if "lfq_fwd" in _backend._module(b).OPS]


def dense(x, dim=-1, inv_temperature=100., diversity_gamma=1., codebook_scale=1., spherical=False, num_codebooks=1,
          entropy="exact", eps=1e-5):
    """The formula as the papers (and vector-quantize-pytorch) write it: the full tokens x codes softmax."""
    xt = x.movedim(dim, -1)
    k = xt.shape[-1] // num_codebooks
    xg = xt.reshape(-1, num_codebooks, k)
    norm = torch.nn.functional.normalize
    if spherical:
        xg = norm(xg, dim=-1) * codebook_scale
    bits = ((torch.arange(2 ** k)[:, None] >> torch.arange(k - 1, -1, -1)) & 1).to(x.dtype)
    codes = (bits * 2 - 1) * codebook_scale
    q = torch.where(xg > 0, codebook_scale, -codebook_scale).to(x.dtype)
    if spherical:
        codes, q = norm(codes, dim=-1) * codebook_scale, norm(q, dim=-1) * codebook_scale
    p = (2 * inv_temperature * torch.einsum("ngk,ck->ngc", xg, codes)).softmax(-1)
    if entropy == "clamped":
        def h(p): return -(p * p.clamp(min=eps).log()).sum(-1)
    else:
        def h(p): return -(p * torch.where(p > 0, p, torch.ones_like(p)).log()).sum(-1)
    ps, cb = h(p).mean(), h(p.mean(0)).mean()
    idx = ((xg > 0).long() << torch.arange(k - 1, -1, -1)).sum(-1)
    return vk.LFQResult((xg + (q - xg).detach()).reshape(xt.shape).movedim(-1, dim),
                        idx.reshape(xt.shape[:-1] + (num_codebooks,)), ps - diversity_gamma * cb, ps, cb,
                        (xg - q.detach()).square().mean())


CASES = [
    ((7, 5), dict()),
    ((3, 4, 6), dict(spherical=True, codebook_scale=0.7)),
    ((9, 8), dict(num_codebooks=2, inv_temperature=3.0, diversity_gamma=0.5)),
    ((13, 6), dict(entropy="clamped", inv_temperature=10.0)),
    ((2, 6, 3, 2), dict(dim=1, spherical=True, num_codebooks=2, entropy="clamped", inv_temperature=5.0)),
    ((2, 3, 4), dict(dim=1, inv_temperature=0.5, codebook_scale=2.0)),
    ((5, 1), dict(inv_temperature=1.0)),  # K = 1
]


def _combo(res, w, c):
    return ((res.quantized * w).sum() * c[0] + res.entropy_loss * c[1] + res.per_sample_entropy * c[2]
            + res.codebook_entropy * c[3] + res.commitment_loss * c[4])


@pytest.mark.parametrize("shape, kw", CASES)
def test_matches_dense_formula_float64(shape, kw):
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(len(shape))).requires_grad_()
    got, want = vk.lookup_free_quantize(x, **kw), dense(x, **kw)
    assert got.indices.dtype == torch.int64 and torch.equal(got.indices, want.indices)
    for name in ("quantized", "entropy_loss", "per_sample_entropy", "codebook_entropy", "commitment_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-9, atol=1e-11, msg=name)
    w = torch.randn(x.shape, dtype=x.dtype, generator=torch.Generator().manual_seed(1))
    for c in [(1, 0, 0, 0, 1), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (0.3, 0.7, -1.1, 0.5, 2)]:
        g1, = torch.autograd.grad(_combo(vk.lookup_free_quantize(x, **kw), w, c), x)
        g2, = torch.autograd.grad(_combo(dense(x, **kw), w, c), x)
        torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10, msg=str(c))


@pytest.mark.parametrize("kw", [dict(spherical=True, num_codebooks=2, inv_temperature=2.0),
                                dict(entropy="clamped", inv_temperature=3.0, eps=1e-2)])
def test_gradcheck_reference(kw):
    x = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    w = torch.randn(5, 6, dtype=torch.float64)
    torch.autograd.gradcheck(lambda t: _combo(vk.lookup_free_quantize(t, **kw), w, (0, 1, 0.5, 0.3, 2)), (x,))  # the straight-through value is not differentiable


def test_tiles_blocks_and_float32():
    """Many token blocks and code tiles (tiny tile budget) give the single-tile numbers; float32 agrees with float64."""
    x = torch.randn(300, 10, generator=torch.Generator().manual_seed(0)) * 0.05
    for entropy in ("exact", "clamped"):
        want = vk.lookup_free_quantize(x.double(), inv_temperature=10.0, entropy=entropy)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ref, "_TILE_ELEMENTS", 64)
            got = vk.lookup_free_quantize(x.double(), inv_temperature=10.0, entropy=entropy)
        torch.testing.assert_close(tuple(got), tuple(want), rtol=1e-12, atol=1e-13)
        f32 = vk.lookup_free_quantize(x, inv_temperature=10.0, entropy=entropy)
        for a, b in zip(f32[2:], want[2:]):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = vk.lookup_free_quantize(x, inv_temperature=5.0, num_codebooks=2)
    want = vk.lookup_free_quantize(x.double(), inv_temperature=5.0, num_codebooks=2)
    assert got.quantized.dtype == dtype and got.entropy_loss.dtype == torch.float32
    assert torch.equal(got.indices, want.indices)
    torch.testing.assert_close(got.codebook_entropy.double(), want.codebook_entropy, rtol=1e-5, atol=1e-5)


def test_deterministic():
    x = torch.randn(500, 12, generator=torch.Generator().manual_seed(0)).requires_grad_()
    runs = []
    for _ in range(2):
        r = vk.lookup_free_quantize(x, inv_temperature=3.0, entropy="clamped")
        runs.append((r.entropy_loss, torch.autograd.grad(r.entropy_loss, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_explicit_backend_without_lfq_leaves_it_to_auto():
    """A backend that does not implement the LFQ ops (the CUDA extension) leaves them to "auto"; one that does
    (Triton) runs them."""
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0), device=DEVICE)
    want = vk.lookup_free_quantize(x)
    assert "lfq_fwd" not in _backend._module("cuda").OPS and "lfq_fwd" in _backend._module("torch").OPS
    for backend in _backend.available_backends():
        with vk.use_backend(backend):
            has = "lfq_fwd" in _backend._module(backend).OPS
            want_name = backend if has else _backend._auto("lfq_fwd", x.device, (6, 4))
            assert _backend.resolve_name("lfq_fwd", x.device, (6, 4)) == want_name
            torch.testing.assert_close(tuple(vk.lookup_free_quantize(x)), tuple(want), rtol=1e-5, atol=1e-6)


# fused-kernel cases: K = 1 (no high bits), small K (code tiles masked), odd K, K = 14 (several code tiles per
# side in both passes); one token, tails of the token tiles, several token splits in the average; groups,
# channel-first, spherical, both entropies
FUSED_CASES = [
    ((1, 3), dict()),
    ((70, 1), dict(inv_temperature=1.0, entropy="clamped")),
    ((200, 5), dict(inv_temperature=2.0)),
    ((3, 8, 2, 5), dict(dim=1, num_codebooks=2, spherical=True, entropy="clamped", inv_temperature=4.0)),
    ((37, 9), dict(inv_temperature=0.5, entropy="clamped", eps=1e-3)),
    ((10, 14), dict(inv_temperature=0.2)),  # from K = 12 slow under the interpreter: the mixed combination only
    ((6, 12), dict(inv_temperature=0.3, entropy="clamped")),  # the clamped passes over several low tiles
]
COMBOS = [(0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (0.3, 0.7, -1.1, 0.5, 2)]


@pytest.mark.parametrize("backend", LFQ_BACKENDS)
@pytest.mark.parametrize("shape, kw", FUSED_CASES)
def test_fused_backend_matches_dense_formula(backend, shape, kw):
    """Every loss and the input gradient of each combination of them, float32 on the fused kernels, against the
    dense formula in float64; equal indices and quantized values."""
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE).requires_grad_()
    xd = x.detach().double().requires_grad_()
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    want = dense(xd, **kw)
    with vk.use_backend(backend):
        got = vk.lookup_free_quantize(x, **kw)
        size = lops._size(x, kw.get("dim", -1), kw.get("num_codebooks", 1))
        assert _backend.resolve_name("lfq_fwd", x.device, size) == backend
        args = (kw.get("dim", -1), kw.get("inv_temperature", 100.0), kw.get("codebook_scale", 1.0),
                kw.get("spherical", False), kw.get("num_codebooks", 1), kw.get("entropy") == "clamped",
                kw.get("eps", 1e-5))
        # the batch distribution itself, code by code (the entropies do not see a permutation of the codes)
        torch.testing.assert_close(lops.lfq_fwd(x.detach(), *args)[2].double(),
                                   ref.lfq_forward(xd.detach(), *args)[2], rtol=1e-5, atol=1e-7)
        assert torch.equal(got.indices, want.indices)
        torch.testing.assert_close(got.quantized, want.quantized.float(), rtol=0, atol=0)
        for name in ("entropy_loss", "per_sample_entropy", "codebook_entropy", "commitment_loss"):
            torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-5, atol=1e-6,
                                       msg=name)
        for c in COMBOS if shape[-1] < 12 else COMBOS[-1:]:
            g1, = torch.autograd.grad(_combo(vk.lookup_free_quantize(x, **kw), w, c), x)
            g2, = torch.autograd.grad(_combo(dense(xd, **kw), w.double(), c), xd)
            torch.testing.assert_close(g1.double(), g2, rtol=1e-5, atol=1e-6 * max(1.0, float(g2.abs().max())),
                                       msg=str(c))


@pytest.mark.parametrize("backend", LFQ_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backend_half_inputs(backend, dtype):
    """16-bit x: the kernels accumulate in float32 like the reference; same indices, losses and gradient."""
    x = torch.randn(40, 2, 6, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype).requires_grad_()
    kw = dict(dim=1, inv_temperature=3.0, entropy="clamped")
    out = []
    for name in ("torch", backend):
        with vk.use_backend(name):
            r = vk.lookup_free_quantize(x, **kw)
            out.append((r.indices, r.quantized, r.entropy_loss, torch.autograd.grad(r.entropy_loss, x)[0]))
    (ia, qa, la, ga), (ib, qb, lb, gb) = out
    assert torch.equal(ia, ib) and torch.equal(qa, qb) and lb.dtype == torch.float32 and gb.dtype == dtype
    torch.testing.assert_close(lb, la, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb, ga, rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", LFQ_BACKENDS)
def test_fused_backend_is_deterministic(backend):
    """Bitwise equal losses and gradients across runs (no float atomics; the average's token splits reduced in a
    fixed order)."""
    x = torch.randn(130, 7, generator=torch.Generator().manual_seed(0)).to(DEVICE).requires_grad_()
    runs = []
    with vk.use_backend(backend):
        for _ in range(2):
            r = vk.lookup_free_quantize(x, inv_temperature=2.0, entropy="clamped")
            runs.append((r.entropy_loss, torch.autograd.grad(r.entropy_loss + r.commitment_loss, x)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@gpu
@pytest.mark.parametrize("backend", LFQ_BACKENDS)
def test_fused_memory_at_2_18_codes(backend):
    """The GPU memory target: 2^18 codes x 16384 tokens forward + backward, both entropies, under 1 GiB of peak
    CUDA memory (one dense float32 probability matrix would be 17 GB); in fact O(N K + 2^K): under 64 MiB (about 16
    MiB of token-split partial averages, 1 MiB vectors). CPU twin: test_memory_bound_in_a_fresh_process."""
    x = torch.randn(16384, 18, device=DEVICE).requires_grad_()
    with vk.use_backend(backend):
        for entropy in ("exact", "clamped"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            r = vk.lookup_free_quantize(x, entropy=entropy)
            (r.entropy_loss + r.commitment_loss).backward()
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - base < 64 * 2**20
            assert torch.isfinite(x.grad).all()
            x.grad = None


@pytest.mark.parametrize("clamped", [False, True])
def test_opcheck(clamped):
    x = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    args = (1, 10.0, 1.0, True, 2, clamped, 1e-5)
    torch.library.opcheck(lops.lfq_fwd.op, (x,) + args)
    q, _, avg, ps, commit = lops.lfq_fwd(x, *args)
    torch.library.opcheck(lops.lfq_bwd.op, (torch.ones_like(q), torch.ones_like(avg), torch.ones_like(ps),
                                             torch.ones_like(commit), x) + args)
    torch.library.opcheck(lops.lfq_bwd.op, (None, torch.ones_like(avg), None, None, x) + args)


def test_compile_fullgraph_matches_eager():
    def f(x):
        r = vk.lookup_free_quantize(x, dim=1, inv_temperature=5.0, spherical=True, num_codebooks=2,
                                    entropy="clamped")
        return r.quantized.square().mean() + r.entropy_loss + 0.25 * r.commitment_loss, r.indices

    x = torch.randn(2, 6, 3, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    (loss, idx) = f(x)
    grad, = torch.autograd.grad(loss, x)
    torch._dynamo.reset()
    (closs, cidx) = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    cgrad, = torch.autograd.grad(closs, x)
    assert torch.equal(idx, cidx)
    torch.testing.assert_close(closs, loss)
    torch.testing.assert_close(cgrad, grad)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(3, 4, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (dict(x=torch.ones(0, 4)), ValueError, "x is empty"),
    (dict(x=torch.ones(2, 25)), ValueError, "K = 25"),
    (dict(x=torch.ones(2, 5), num_codebooks=2), ValueError, "not a multiple of num_codebooks"),
    (dict(x=torch.ones(2, 5), num_codebooks=0), ValueError, "num_codebooks must be >= 1"),
    (dict(x=torch.ones(2, 5), dim=2), ValueError, "dim=2 is out of range"),
    (dict(x=torch.ones(2, 5), inv_temperature=0.0), ValueError, "inv_temperature must be > 0"),
    (dict(x=torch.ones(2, 5), codebook_scale="1"), TypeError, "codebook_scale must be a float"),
    (dict(x=torch.ones(2, 5), entropy="approx"), ValueError, "entropy must be one of"),
    (dict(x=torch.ones(2, 5), spherical=1), TypeError, "spherical must be a bool"),
    (dict(x=torch.ones(2, 5), eps=-1.0), ValueError, "eps must be > 0"),
])
def test_bad_input(kwargs, error, match):
    x = kwargs.pop("x")
    with pytest.raises(error, match=match):
        vk.lookup_free_quantize(x, **kwargs)


def test_memory_bound_in_a_fresh_process():
    """2^16 codes x 4096 tokens forward + backward on the CPU reference: peak RSS growth < 64 MiB (the dense
    formula's probability matrix alone is 1 GiB)."""
    code = textwrap.dedent("""
        import re, torch, vaekernels as vk
        def status(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        torch.set_num_threads(1)
        x = torch.randn(4096, 16, generator=torch.Generator().manual_seed(0)).requires_grad_()
        vk.lookup_free_quantize(x[:8].detach())  # import-time and first-call allocations
        for entropy in ("exact", "clamped"):
            base = status("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            r = vk.lookup_free_quantize(x, inv_temperature=1.0, entropy=entropy)
            r.entropy_loss.backward()
            print((status("VmHWM") - base) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"VAEKERNELS_BACKEND": "torch", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    peaks = [float(v) for v in out.stdout.split()]
    assert len(peaks) == 2 and max(peaks) < 64, peaks


@pytest.mark.parametrize("case", ["peaked", "flat", "none_kept", "mixed", "mixed_groups"])
@pytest.mark.parametrize("tile", [None, 64])
def test_clamped_pruning_matches_dense_float64(case, tile):
    """The clamped per-sample entropy touches only the codes with p >= eps: peaked distributions (a few codes above
    eps: kept (token, high) pairs only), flat ones (every code above eps: dense tiles), eps above every p (no pair
    kept) and a mix (a quarter of the tokens flat, all their pairs kept among the others' few), with the default tile
    and a tiny one (a token's pairs split over tiles, many token blocks, both paths in one call); value and gradient
    against the dense float64 formula. Which tile paths ran confirms each case's regime, and with no pair kept the
    entropy is -log(eps) in closed form."""
    gen = torch.Generator().manual_seed(3)
    kw = dict(entropy="clamped", inv_temperature=100.0)
    x = torch.randn(24, 10, dtype=torch.float64, generator=gen)
    if case == "flat":
        x, kw["inv_temperature"] = x * 1e-3, 1.0
    elif case == "none_kept":
        kw.update(inv_temperature=1.0, eps=0.75)
    elif case.startswith("mixed"):
        x[::4] *= 1e-3
        kw.update(inv_temperature=30.0, num_codebooks=2 if case == "mixed_groups" else 1)
    x.requires_grad_()
    w = torch.randn(x.shape, dtype=x.dtype, generator=gen)
    paths = set()

    def spy(name):
        real = getattr(ref, name)
        return lambda *a: (paths.add(name), real(*a))[1]

    with pytest.MonkeyPatch.context() as mp:
        if tile is not None:
            mp.setattr(ref, "_TILE_ELEMENTS", tile)
        for name in ("_dense_tiles", "_pair_tiles"):
            mp.setattr(ref, name, spy(name))
        got = vk.lookup_free_quantize(x, **kw)
        want = dense(x, **kw)
        torch.testing.assert_close(got.per_sample_entropy, want.per_sample_entropy, rtol=1e-10, atol=1e-12)
        if case == "none_kept":  # every p < eps: each token's whole mass counts at -log(eps)
            torch.testing.assert_close(got.per_sample_entropy, -torch.tensor(kw["eps"], dtype=x.dtype).log())
        for c in [(0, 0, 1, 0, 0), (0.3, 0.7, -1.1, 0.5, 2)]:
            g1, = torch.autograd.grad(_combo(vk.lookup_free_quantize(x, **kw), w, c), x)
            g2, = torch.autograd.grad(_combo(dense(x, **kw), w, c), x)
            torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10, msg=str(c))
    if case.startswith("mixed"):  # whole-flat token blocks go dense with the tiny tile
        assert paths == ({"_pair_tiles"} if tile is None else {"_pair_tiles", "_dense_tiles"}), paths
    else:
        assert paths == {"_dense_tiles" if case == "flat" else "_pair_tiles"}, paths
