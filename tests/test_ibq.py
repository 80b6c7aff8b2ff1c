"""vk.index_backprop_quantize (IBQ with MAGVIT-v2's entropy loss) against the dense rows x codes formula."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import vaekernels as vk
from vaekernels import _backend
from vaekernels.ops import ibq as iops
from vaekernels.reference import ibq as ref

from .conftest import DEVICE, FUSED_BACKENDS

IBQ_BACKENDS = [b for b in FUSED_BACKENDS if "ibq_fwd" in _backend._module(b).OPS]


def dense(z, codebook, dim=-1, beta=0.25, entropy_temperature=0.01, sample_entropy_weight=1.0,
          codebook_entropy_weight=1.0, eps=1e-5, entropy=True):
    """The formulas as SEED-Voken's IndexPropagationQuantize and MAGVIT-v2's entropy loss write them: every
    rows x codes tensor (logits, softmax, one-hot) in full."""
    zt = z.movedim(dim, -1)
    zr = zt.reshape(-1, zt.shape[-1])
    logits = zr @ codebook.t()
    soft = logits.softmax(-1)
    ind = logits.argmax(-1)
    hard = F.one_hot(ind, codebook.shape[0]).to(z.dtype)
    z_q = (hard - soft.detach() + soft) @ codebook
    z_q2 = hard @ codebook
    quant = ((z_q - zr) ** 2).mean() + ((z_q2.detach() - zr) ** 2).mean() + beta * ((z_q2 - zr.detach()) ** 2).mean()
    quantized = z_q.reshape(zt.shape).movedim(-1, dim)
    indices = ind.reshape(zt.shape[:-1])
    if not entropy:
        return vk.IBQResult(quantized, indices, quant, None, None, None)
    p = (logits / entropy_temperature).softmax(-1)
    logp = (logits / entropy_temperature).log_softmax(-1)
    ps = (-(p * logp).sum(-1)).mean()
    avg = p.mean(0)
    cb = -(avg * (avg + eps).log()).sum()
    return vk.IBQResult(quantized, indices, quant, ps, cb, sample_entropy_weight * ps - codebook_entropy_weight * cb)


def _combo(r, w, c):
    out = (r.quantized * w).sum() * c[0] + r.quant_loss * c[1]
    if r.per_sample_entropy is not None:
        out = out + r.per_sample_entropy * c[2] + r.codebook_entropy * c[3] + r.entropy_loss * c[4]
    return out


def _data(zshape, k, dtype=torch.float64, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    d = zshape[-1]
    z = torch.randn(zshape, dtype=torch.float64, generator=g) * scale
    cb = torch.randn(k, d, dtype=torch.float64, generator=g)
    return z.to(device, dtype).requires_grad_(), cb.to(device, dtype).requires_grad_()


NAMES = ("quantized", "quant_loss", "per_sample_entropy", "codebook_entropy", "entropy_loss")
COMBOS = [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (0, 0, 1, 0, 0), (0, 0, 0, 1, 0), (0.7, -1.3, 0.4, 2.1, 0.5)]
# (z shape, codes, keywords, tile): channel-last and channel-first, one row block and several (N not a multiple
# of the block), entropy off, other temperatures and weights
CASES = [
    ((7, 5), 11, dict(), None),
    ((2, 6, 3, 4), 13, dict(dim=1, entropy_temperature=0.3), None),
    ((40, 8), 37, dict(entropy_temperature=0.5, beta=0.7, sample_entropy_weight=0.3), 40 * 5),
    ((3, 4, 2, 6), 29, dict(dim=-1, codebook_entropy_weight=2.0, eps=1e-3), 24 * 4),
    ((9, 6), 17, dict(entropy=False), 9 * 4),
    ((5, 3, 4), 10, dict(dim=1, entropy=False, beta=0.0), None),
]


@pytest.mark.parametrize("zshape, k, kw, tile", CASES)
def test_matches_dense_formula_float64(zshape, k, kw, tile):
    dim = kw.get("dim", -1)
    z, cb = _data(zshape if dim == -1 else zshape, k, seed=k)
    if dim != -1:  # the codebook's width is z's size along dim
        cb = torch.randn(k, zshape[dim], dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        cb.requires_grad_()
    w = torch.randn(zshape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with pytest.MonkeyPatch.context() as mp_:
        if tile is not None:
            mp_.setattr(ref, "_TILE_ELEMENTS", tile)
        got, want = vk.index_backprop_quantize(z, cb, **kw), dense(z, cb, **kw)
        assert got.indices.dtype == torch.int64 and torch.equal(got.indices, want.indices)
        for name in NAMES:
            if getattr(want, name) is None:
                assert getattr(got, name) is None
                continue
            torch.testing.assert_close(getattr(got, name), getattr(want, name), rtol=1e-10, atol=1e-12, msg=name)
        for c in COMBOS:
            g1 = torch.autograd.grad(_combo(vk.index_backprop_quantize(z, cb, **kw), w, c), (z, cb))
            g2 = torch.autograd.grad(_combo(dense(z, cb, **kw), w, c), (z, cb))
            for a, b, name in zip(g1, g2, ("dz", "dcodebook")):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=f"{name} {c}")


def test_gradcheck_reference():
    """The entropies are smooth functions of z and the codebook (quantized and quant_loss are not: their values
    follow the hard code, their gradients IBQ's estimator, checked against the dense formula above)."""
    z, cb = _data((4, 3), 6, seed=3)

    def f(z, cb):
        return _combo(vk.index_backprop_quantize(z, cb, entropy_temperature=0.7), 0.0, (0, 0, 0.3, -0.8, 1))

    torch.autograd.gradcheck(f, (z, cb))


@pytest.mark.parametrize("tile", [None, 6])
def test_ties_take_the_lowest_index(tile):
    """Equal logits (duplicate codes 1, 4 and 7), all rows in one block and one row per block: the lowest index
    wins; the soft path still spreads the gradient over every duplicate, as the dense formula does."""
    z, cb = _data((6, 4), 9, seed=4)
    cb = cb.detach().clone()
    cb[4], cb[7] = cb[1], cb[1]
    z = (cb[1].repeat(6, 1) * 3 + 0.01 * z.detach()).requires_grad_()
    cb.requires_grad_()
    with pytest.MonkeyPatch.context() as mp_:
        if tile is not None:
            mp_.setattr(ref, "_TILE_ELEMENTS", tile)  # fewer logits than one row has: one row per block
        got = vk.index_backprop_quantize(z, cb, entropy_temperature=0.5)
        want = dense(z, cb, entropy_temperature=0.5)
        assert (got.indices == 1).all() and torch.equal(got.indices, want.indices)
        g1 = torch.autograd.grad(_combo(got, 1.0, COMBOS[-1]), (z, cb))
        g2 = torch.autograd.grad(_combo(want, 1.0, COMBOS[-1]), (z, cb))
        for a, b in zip(g1, g2):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_nan_row_gets_minus_one_and_stays_nan():
    z, cb = _data((5, 4), 7, seed=5)
    z = z.detach().clone()
    z[2, 1] = float("nan")
    z.requires_grad_()
    r = vk.index_backprop_quantize(z, cb)
    want = dense(z.detach()[[0, 1, 3, 4]], cb.detach())
    assert r.indices[2] == -1 and torch.equal(r.indices[[0, 1, 3, 4]], want.indices)
    assert r.quantized[2].isnan().all() and not r.quantized[[0, 1, 3, 4]].isnan().any()
    assert r.quant_loss.isnan() and r.per_sample_entropy.isnan() and r.codebook_entropy.isnan()
    gz, gc = torch.autograd.grad(r.quant_loss + r.entropy_loss, (z, cb))
    assert gz[2].isnan().all() and gc.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    """16-bit z and codebook: float32 logits and sums; the float64 formula on the same (rounded) inputs agrees."""
    z, cb = _data((64, 16), 50, dtype=dtype, seed=6, scale=0.3)
    zd, cbd = (t.detach().double().requires_grad_() for t in (z, cb))
    kw = dict(entropy_temperature=0.1)
    got, want = vk.index_backprop_quantize(z, cb, **kw), dense(zd, cbd, **kw)
    assert got.quantized.dtype == dtype and got.quant_loss.dtype == torch.float32
    assert torch.equal(got.indices, want.indices)
    for name in NAMES[1:]:
        torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-5, atol=1e-5, msg=name)
    w = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    g1 = torch.autograd.grad(_combo(got, w.to(dtype), COMBOS[-1]), (z, cb))
    g2 = torch.autograd.grad(_combo(want, w.double(), COMBOS[-1]), (zd, cbd))
    for a, b in zip(g1, g2):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_deterministic():
    z, cb = _data((300, 12), 70, dtype=torch.float32, seed=7)
    runs = []
    for _ in range(2):
        r = vk.index_backprop_quantize(z, cb, entropy_temperature=0.2)
        runs.append((r.entropy_loss, r.quant_loss, *torch.autograd.grad(r.entropy_loss + r.quant_loss, (z, cb))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_without_grad_and_only_codebook_grad():
    z, cb = _data((6, 4), 5, seed=8)
    with torch.no_grad():
        r = vk.index_backprop_quantize(z, cb)
    assert r.quantized.grad_fn is None
    zd = z.detach()
    g1, = torch.autograd.grad(vk.index_backprop_quantize(zd, cb).entropy_loss, cb)
    g2, = torch.autograd.grad(dense(zd, cb).entropy_loss, cb)
    torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-11)


def test_opcheck():
    z, cb = _data((2, 3, 4), 5, dtype=torch.float32, seed=9)
    z, cb = z.detach(), cb.detach()
    for entropy in (True, False):
        args = (2, 0.25, 0.5, entropy)
        torch.library.opcheck(iops.ibq_fwd.op, (z, cb) + args)
    q, ind, avg, ps, quant, stats, pc = iops.ibq_fwd(z, cb, 2, 0.25, 0.5, True)
    rest = (z, cb, ind, stats, pc, 2, 0.25, 0.5)
    torch.library.opcheck(iops.ibq_bwd.op, (torch.ones_like(q), torch.ones_like(avg), torch.ones_like(ps),
                                             torch.ones_like(quant)) + rest)
    torch.library.opcheck(iops.ibq_bwd.op, (None, None, None, torch.ones_like(quant)) + rest)


def test_compile_fullgraph_matches_eager():
    def f(z, cb):
        r = vk.index_backprop_quantize(z, cb, dim=1, entropy_temperature=0.3)
        return r.quantized.square().mean() + r.quant_loss + r.entropy_loss, r.indices

    g = torch.Generator().manual_seed(10)
    z = torch.randn(2, 6, 3, 3, generator=g).requires_grad_()
    cb = torch.randn(5, 6, generator=g).requires_grad_()
    loss, idx = f(z, cb)
    grads = torch.autograd.grad(loss, (z, cb))
    torch._dynamo.reset()
    closs, cidx = torch.compile(f, fullgraph=True, backend="aot_eager")(z, cb)
    cgrads = torch.autograd.grad(closs, (z, cb))
    assert torch.equal(idx, cidx)
    torch.testing.assert_close(closs, loss)
    for a, b in zip(cgrads, grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(z=[1.0]), TypeError, "z must be a torch.Tensor"),
    (dict(z=torch.ones(3, 4, dtype=torch.long)), TypeError, "z must be a floating-point"),
    (dict(z=torch.ones(0, 4)), ValueError, "z is empty"),
    (dict(codebook=torch.ones(5, 3)), ValueError, "codebook has code_dim 3"),
    (dict(codebook=torch.ones(5)), ValueError, "codebook must be 2-D"),
    (dict(codebook=torch.ones(0, 4)), ValueError, "codebook is empty"),
    (dict(codebook=torch.ones(5, 4, dtype=torch.long)), TypeError, "codebook must be a floating-point"),
    (dict(dim=2), ValueError, "dim=2 is out of range"),
    (dict(beta=-1.0), ValueError, "beta must be >= 0"),
    (dict(entropy_temperature=0.0), ValueError, "entropy_temperature must be > 0"),
    (dict(sample_entropy_weight="1"), TypeError, "sample_entropy_weight must be a float"),
    (dict(codebook_entropy_weight=None), TypeError, "codebook_entropy_weight must be a float"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(entropy=1), TypeError, "entropy must be a bool"),
    (dict(distributed="yes"), TypeError, "distributed must be a bool"),
])
def test_bad_input(kwargs, error, match):
    z = kwargs.pop("z", torch.ones(2, 4))
    cb = kwargs.pop("codebook", torch.ones(5, 4))
    with pytest.raises(error, match=match):
        vk.index_backprop_quantize(z, cb, **kwargs)


def _ddp_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    z, cb = _data((8, 4), 6, seed=11)
    zr = z.detach().chunk(world)[rank].clone().requires_grad_()
    r = vk.index_backprop_quantize(zr, cb, entropy_temperature=0.5, distributed=True)
    gz, = torch.autograd.grad(r.codebook_entropy, zr)
    torch.save({"cb": r.codebook_entropy.detach(), "gz": gz}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_distributed_averages_the_codebook_distribution_with_gradient(tmp_path):
    """Two ranks with half the rows each: the codebook entropy is the whole batch's, and each rank's rows get world
    size times the whole batch's gradient (all_reduce's backward sums the replicated loss over ranks; DDP's mean of
    the parameter gradients then gives the single-process gradient, as for lookup_free_quantize)."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    z, cb = _data((8, 4), 6, seed=11)
    whole = dense(z, cb, entropy_temperature=0.5)
    gz, = torch.autograd.grad(whole.codebook_entropy, z)
    for rank in range(2):
        got = torch.load(tmp_path / f"{rank}.pt")
        torch.testing.assert_close(got["cb"], whole.codebook_entropy.detach(), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got["gz"], 2 * gz.chunk(2)[rank], rtol=1e-9, atol=1e-11)


def test_memory_bound_in_a_fresh_process():
    """N = 1024 rows, K = 16384 codes, D = 256 with the entropy loss, forward + backward on the CPU reference: peak
    RSS growth under 200 MiB (the dense formula: 0.58 GiB; one float32 rows x codes matrix alone is 64 MiB)."""
    code = textwrap.dedent("""
        import re, torch, vaekernels as vk
        def status(key):
            return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
        torch.set_num_threads(1)
        g = torch.Generator().manual_seed(0)
        z = torch.randn(1024, 256, generator=g).requires_grad_()
        cb = torch.randn(16384, 256, generator=g).requires_grad_()
        vk.index_backprop_quantize(z[:8].detach(), cb[:64].detach())  # import-time and first-call allocations
        base = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        r = vk.index_backprop_quantize(z, cb)
        (r.quantized.sum() + r.quant_loss + r.entropy_loss).backward()
        print((status("VmHWM") - base) / 2**20)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={"VAEKERNELS_BACKEND": "torch", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    peak = float(out.stdout.split()[-1])
    assert peak < 200, peak


def test_module():
    """vk.nn.IndexBackpropQuantizer: N(0, 1) codebook Parameter, channel-first by default, loss = quant_loss +
    entropy_weight * entropy_loss, code usage counted in training only, perplexity of this batch's codes."""
    torch.manual_seed(0)
    ibq = vk.nn.IndexBackpropQuantizer(64, 8, entropy_weight=0.1, entropy_temperature=0.2)
    assert isinstance(ibq.codebook, torch.nn.Parameter) and abs(float(ibq.codebook.detach().std()) - 1) < 0.2
    z = torch.randn(2, 8, 3, 5, requires_grad=True)
    out = ibq(z)
    want = dense(z, ibq.codebook, dim=1, entropy_temperature=0.2)
    assert torch.equal(out.indices, want.indices) and out.indices.shape == (2, 3, 5)
    torch.testing.assert_close(out.loss, want.quant_loss + 0.1 * want.entropy_loss)
    counts = torch.bincount(want.indices.reshape(-1), minlength=64).float()
    assert torch.equal(ibq.code_usage, counts)
    f = counts / counts.sum()
    torch.testing.assert_close(out.perplexity, torch.exp(-(f * torch.log(f + 1e-30)).sum()))
    out.loss.backward()
    assert ibq.codebook.grad is not None and (ibq.codebook.grad != 0).sum() > 30  # every code trains
    ibq.eval()
    ibq(z)
    assert torch.equal(ibq.code_usage, counts)
    ibq.reset_usage()
    assert not ibq.code_usage.any()
    off = vk.nn.IndexBackpropQuantizer(64, 8, entropy_weight=0.0)(z)
    assert off.entropy_loss is None and torch.equal(off.loss, off.quant_loss)
    with pytest.raises(TypeError, match="num_codes must be an int"):
        vk.nn.IndexBackpropQuantizer(2.5, 8)


# fused-kernel cases: one row, fewer codes than a tile, row and code tails, several code ranges in the sweep and
# the dz pass and several row ranges in the column sums and dC (their partial states merged), D not a power of two
# (100: the logits over seven D chunks, dC in two column chunks; 200: P C and dz in two column chunks, dC in four),
# channel-first, entropy off, the training temperature 0.01
FUSED_CASES = [
    ((1, 5), 3, dict()),
    ((37, 8), 70, dict(entropy_temperature=0.3)),
    ((2, 20, 3, 3), 130, dict(dim=1, entropy=False, beta=0.5)),
    ((70, 24), 300, dict(entropy_temperature=0.01)),
    ((16, 100), 33, dict(entropy_temperature=0.2, sample_entropy_weight=0.5)),
    ((12, 200), 45, dict(entropy_temperature=0.1, codebook_entropy_weight=0.7)),
]


@pytest.mark.parametrize("backend", IBQ_BACKENDS)
@pytest.mark.parametrize("zshape, k, kw", FUSED_CASES)
def test_fused_backend_matches_dense_formula(backend, zshape, k, kw):
    """float32 on the fused kernels against the dense formula in float64: indices, quantized, every loss, and dz,
    dC of a random combination of all outputs."""
    dim = kw.get("dim", -1)
    g = torch.Generator().manual_seed(k)
    z = torch.randn(zshape, generator=g).to(DEVICE).requires_grad_()
    cb = torch.randn(k, zshape[dim], generator=g).to(DEVICE).requires_grad_()
    w = torch.randn(zshape, generator=g).to(DEVICE)
    zd, cbd = (t.detach().double().requires_grad_() for t in (z, cb))
    want = dense(zd, cbd, **kw)
    with vk.use_backend(backend):
        assert _backend.resolve_name("ibq_fwd", z.device, iops._size(z, cb, dim % z.dim())) == backend
        got = vk.index_backprop_quantize(z, cb, **kw)
        assert torch.equal(got.indices, want.indices)
        assert torch.equal(got.quantized.movedim(dim, -1), cb.detach()[got.indices])
        for name in NAMES[1:]:
            if getattr(want, name) is not None:
                torch.testing.assert_close(getattr(got, name).double(), getattr(want, name), rtol=1e-5, atol=1e-6,
                                           msg=name)
        c = COMBOS[-1]
        g1 = torch.autograd.grad(_combo(got, w, c), (z, cb))
        g2 = torch.autograd.grad(_combo(want, w.double(), c), (zd, cbd))
        for a, b, name in zip(g1, g2, ("dz", "dcodebook")):
            torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=name)


@pytest.mark.parametrize("backend", IBQ_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_backend_half_inputs(backend, dtype):
    """16-bit inputs: float32 logits and sums as in the reference; same indices, losses and gradients."""
    z, cb = _data((50, 16), 40, dtype=dtype, seed=12, scale=0.5, device=DEVICE)
    out = []
    for name in ("torch", backend):
        with vk.use_backend(name):
            r = vk.index_backprop_quantize(z, cb, entropy_temperature=0.1)
            out.append((r, torch.autograd.grad(r.quant_loss + r.entropy_loss + r.quantized.sum(), (z, cb))))
    (ra, ga), (rb, gb) = out
    assert torch.equal(ra.indices, rb.indices) and torch.equal(ra.quantized, rb.quantized)
    for name in NAMES[1:]:
        torch.testing.assert_close(getattr(rb, name), getattr(ra, name), rtol=1e-5, atol=1e-5, msg=name)
    for a, b in zip(ga, gb):
        assert b.dtype == dtype
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-2, atol=1e-2 * float(a.abs().max()))


@pytest.mark.parametrize("backend", IBQ_BACKENDS)
def test_fused_backend_ties_nan_and_determinism(backend):
    """Duplicate codes in different code ranges: the lowest index; a NaN row: -1, NaN out; two runs: bitwise equal
    losses and gradients (partial states and sums merged in a fixed order, no atomics)."""
    z, cb = _data((40, 8), 200, dtype=torch.float32, seed=13, device=DEVICE)
    cb = cb.detach().clone()
    cb[150] = cb[3]
    z = z.detach().clone()
    z[5] = cb[3] * 4
    z[7, 2] = float("nan")
    z.requires_grad_()
    cb.requires_grad_()
    runs = []
    with vk.use_backend(backend):
        for _ in range(2):
            r = vk.index_backprop_quantize(z, cb, entropy_temperature=0.5)
            runs.append((r.indices, r.quant_loss, r.entropy_loss,
                         *torch.autograd.grad(r.quantized.nansum() + r.entropy_loss, (z, cb))))
    for a, b in zip(*runs):  # NaN in the same places, the rest bitwise equal
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())
    ind = runs[0][0]
    assert ind[5] == 3 and ind[7] == -1
    with vk.use_backend("torch"):
        want = vk.index_backprop_quantize(z, cb, entropy_temperature=0.5).indices
    assert torch.equal(ind, want)
    z_ok = z.detach()[torch.arange(40) != 7].requires_grad_()
    with vk.use_backend(backend):
        r = vk.index_backprop_quantize(z_ok, cb, entropy_temperature=0.5)
        grads = torch.autograd.grad(r.quant_loss + r.entropy_loss, (z_ok, cb))
    with vk.use_backend("torch"):
        r2 = vk.index_backprop_quantize(z_ok, cb, entropy_temperature=0.5)
        want_grads = torch.autograd.grad(r2.quant_loss + r2.entropy_loss, (z_ok, cb))
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
