"""vk.kmeans against a plain float64 Lloyd's algorithm from the same initial sample (every backend, l2, cosine,
channel-first, fewer rows than codes), its argument errors, the modules' kmeans_init, a two-process DDP run
against Lloyd on the union of the ranks' rows, and its memory at LlamaGen's size in a fresh process."""
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
from vaekernels._kmeans import lloyd
from .conftest import DEVICE, FUSED_BACKENDS
from .doubles.compare import OpCalls


def _data(n, d, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 2).to(dtype)


def _initial(n, k, seed):
    """The initial sample's row indices vk.kmeans draws from torch.Generator().manual_seed(seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k] if n >= k else torch.randint(n, (k,), generator=g)


def lloyd64(r, init, iters, cosine=False):
    """Textbook Lloyd's algorithm in float64 with the full distance matrix: (centres, counts of the last step)."""
    r = r.double()
    if cosine:
        r = F.normalize(r, dim=-1)
    c, counts = r[init], None
    for _ in range(iters):
        assign = ((r[:, None, :] - c[None, :, :]) ** 2).sum(-1).argmin(1)  # first index on exact ties
        counts = torch.bincount(assign, minlength=c.shape[0])
        means = torch.zeros_like(c).index_add_(0, assign, r) / counts.clamp_min(1)[:, None]
        if cosine:
            means = F.normalize(means, dim=-1)
        c = torch.where(counts[:, None] > 0, means, c)
    return c, counts


@pytest.mark.parametrize("case", ["l2", "cosine", "channel_first", "fewer_rows_than_codes", "float64"])
def test_matches_lloyd_in_float64(case):
    n, d, k, iters, seed = 300, 4, 16, 8, 3
    dtype = torch.float64 if case == "float64" else torch.float32
    x = _data(n, d, dtype=dtype)
    distance = "cosine" if case == "cosine" else "l2"
    if case == "fewer_rows_than_codes":
        n, x = 5, x[:5]
    dim, arg = -1, x
    if case == "channel_first":  # (B, D, H, W) with the rows along dim 1
        arg, dim = x.reshape(3, 10, 10, d).permute(0, 3, 1, 2), 1
    got, counts = lloyd(arg, k, iters=iters, distance=distance, dim=dim, generator=torch.Generator().manual_seed(seed))
    want, want_counts = lloyd64(x, _initial(n, k, seed), iters, cosine=distance == "cosine")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got, want.to(got.dtype), atol=tol, rtol=tol)
    assert torch.equal(counts, want_counts) and int(counts.sum()) == n
    if case == "fewer_rows_than_codes":  # duplicated initial centres: later copies never win a row, keep their value
        assert (counts == 0).any()
    public = vk.kmeans(arg, k, iters=iters, distance=distance, dim=dim, generator=torch.Generator().manual_seed(seed))
    assert public.dtype == dtype and public.shape == (k, d)
    torch.testing.assert_close(public, got.to(dtype), atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["torch"] + FUSED_BACKENDS)
def test_every_backend(backend):
    x = _data(40, 4, seed=1).to(DEVICE)
    with vk.use_backend(backend), OpCalls() as calls:
        got = vk.kmeans(x, 6, iters=2, generator=torch.Generator(DEVICE).manual_seed(2))
    assert calls.names.count("vaekernels::vq_fwd") == 2  # one fused search per iteration
    g = torch.Generator(DEVICE).manual_seed(2)
    want, _ = lloyd64(x.cpu(), torch.randperm(40, generator=g, device=DEVICE)[:6].cpu(), 2)
    torch.testing.assert_close(got.cpu(), want.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cosine", [False, True])
def test_same_as_vector_quantize_pytorch_from_the_same_seed(cosine):
    vqp = pytest.importorskip("vector_quantize_pytorch.vector_quantize_pytorch")
    x = _data(200, 8, seed=4)
    if cosine:
        x = F.normalize(x, dim=-1)  # the library's codebook normalises before its kmeans
    torch.manual_seed(11)
    want, bins = vqp.kmeans(x[None], 24, 6, use_cosine_sim=cosine)
    torch.manual_seed(11)
    got, counts = lloyd(x, 24, iters=6, distance="cosine" if cosine else "l2")
    torch.testing.assert_close(got, want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, bins[0])


def test_draws_only_the_initial_sample():
    x = _data(50, 3)
    g, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    before = torch.get_rng_state()
    vk.kmeans(x, 7, iters=3, generator=g)
    torch.randperm(50, generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())
    assert torch.equal(torch.get_rng_state(), before)  # an explicit generator leaves the global one alone
    g, expected = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    vk.kmeans(x[:4], 7, iters=3, generator=g)
    torch.randint(4, (7,), generator=expected)
    assert torch.equal(g.get_state(), expected.get_state())


def test_low_precision_input_returns_its_dtype_and_zero_iterations_the_sample():
    x = _data(64, 4)
    got = vk.kmeans(x.to(torch.bfloat16), 8, iters=3, generator=torch.Generator().manual_seed(0))
    assert got.dtype == torch.bfloat16
    start = vk.kmeans(x, 8, iters=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(start, x[_initial(64, 8, 0)])


@pytest.mark.parametrize("call, error, match", [
    (lambda x: vk.kmeans(x, 0), ValueError, "num_codes must be >= 1"),
    (lambda x: vk.kmeans(x, 2.5), TypeError, "num_codes must be an int"),
    (lambda x: vk.kmeans(x, True), TypeError, "num_codes must be an int"),
    (lambda x: vk.kmeans(x.long(), 4), TypeError, "x must be a floating-point tensor"),
    (lambda x: vk.kmeans(x.numpy(), 4), TypeError, "x must be a torch.Tensor"),
    (lambda x: vk.kmeans(x[:0], 4), ValueError, "x is empty"),
    (lambda x: vk.kmeans(x[:, :0], 4), ValueError, "x is empty"),
    (lambda x: vk.kmeans(x[0, 0], 4), ValueError, "at least one dimension"),
    (lambda x: vk.kmeans(x, 4, distance="dot"), ValueError, "distance must be one of 'l2', 'cosine'"),
    (lambda x: vk.kmeans(x, 4, iters=-1), ValueError, "iters must be >= 0"),
    (lambda x: vk.kmeans(x, 4, dim=2), ValueError, "dim=2 is out of range"),
    (lambda x: vk.kmeans(x, 4, generator=0), TypeError, "generator must be a torch.Generator"),
    (lambda x: vk.kmeans(x.index_fill(0, torch.tensor([3]), float("nan")), 4), ValueError, "NaN"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(_data(10, 3))


def test_module_ema_kmeans_init_then_the_usual_step():
    z = _data(96, 4, seed=6)
    torch.manual_seed(0)
    vq = vk.nn.VectorQuantizer(16, 4, ema=True, decay=0.8, kmeans_init=True, kmeans_iters=5)
    assert not vq.initted and "initted" in vq.state_dict()
    torch.manual_seed(1)
    out = vq(z)
    torch.manual_seed(1)
    centres, counts = lloyd(z, 16, iters=5)
    ref = vk.nn.VectorQuantizer(16, 4, ema=True, decay=0.8)  # the same step from the state kmeans_init sets
    ref.codebook.copy_(centres)
    ref.cluster_size.copy_(counts)
    ref.embed_sum.copy_(centres * counts[:, None])
    want = ref(z)
    assert bool(vq.initted)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for name in ("codebook", "cluster_size", "embed_sum"):
        torch.testing.assert_close(getattr(vq, name), getattr(ref, name), atol=0, rtol=0)


def test_module_learned_kmeans_init_cosine_channel_first_and_state_dict():
    z = _data(64, 4, seed=7).reshape(4, 4, 4, 4).permute(0, 3, 1, 2)  # NCHW
    vq = vk.nn.VectorQuantizer(8, 4, kmeans_init=True, kmeans_iters=4, distance="cosine", dim=1)
    vq.eval()(z)
    assert not vq.initted  # only a training forward initialises
    torch.manual_seed(2)
    out = vq.train()(z)
    torch.manual_seed(2)
    want = vk.kmeans(z, 8, iters=4, dim=1, distance="cosine")
    torch.testing.assert_close(vq.codebook.detach(), want, atol=0, rtol=0)
    assert torch.equal(out.indices, vk.nearest_code(z, want, distance="cosine", dim=1))
    restored = vk.nn.VectorQuantizer(8, 4, kmeans_init=True, kmeans_iters=4, distance="cosine", dim=1)
    restored.load_state_dict(vq.state_dict())
    restored(z * 3 + 1)
    assert bool(restored.initted) and torch.equal(restored.codebook, vq.codebook)  # no second k-means


def test_compile_fullgraph_after_the_eager_init_step():
    z = _data(64, 4, seed=10)
    vq = vk.nn.VectorQuantizer(16, 4, kmeans_init=True, kmeans_iters=2)
    with pytest.raises(Exception, match="kmeans_init runs eagerly"):
        torch.compile(vq, fullgraph=True, backend="aot_eager")(z)
    assert not vq.initted
    vq(z)  # the k-means step, eagerly
    compiled = torch.compile(vq, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(z), vq(z))


def test_checkpoint_without_initted_loads_strictly_as_initialised():
    old = vk.nn.VectorQuantizer(8, 4, ema=True).state_dict()
    del old["initted"]  # what modules saved before kmeans_init existed
    vq = vk.nn.VectorQuantizer(8, 4, ema=True, kmeans_init=True)
    vq.load_state_dict(old)
    plain = vk.nn.VectorQuantizer(8, 4, ema=True)
    plain.load_state_dict(old)
    assert bool(vq.initted) and bool(plain.initted)
    vq(_data(32, 4))
    plain(_data(32, 4))
    assert torch.equal(vq.codebook, plain.codebook)  # the restored codebook was kept: no k-means


def test_residual_kmeans_init_level_by_level():
    z = _data(80, 4, seed=8)
    torch.manual_seed(0)
    rvq = vk.nn.ResidualVectorQuantizer(3, 8, 4, kmeans_init=True, kmeans_iters=3)
    torch.manual_seed(4)
    rvq(z)
    torch.manual_seed(4)
    residual = z
    for layer in rvq.layers:
        c = vk.kmeans(residual, 8, iters=3)
        torch.testing.assert_close(layer.codebook.detach(), c, atol=0, rtol=0)
        residual = residual - c[vk.nearest_code(residual, c)]


# two gloo processes with different rows and different seeds: every rank must end with Lloyd on the union,
# started from rank 0's sample
_SIZES, _K, _ITERS = (40, 24), 8, 4


def _ddp_rows():
    return _data(sum(_SIZES), 4, seed=9).split(_SIZES)


def _ddp_worker(rank, world, init_file, out_dir):
    import vector_quantize_pytorch as vqp

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x, out = _ddp_rows()[rank], {}
    for distance in ("l2", "cosine"):
        g = torch.Generator().manual_seed(5 + rank)
        out[distance] = lloyd(x, _K, iters=_ITERS, distance=distance, generator=g)
    vq = vk.nn.VectorQuantizer(_K, 4, kmeans_init=True, kmeans_iters=_ITERS)
    torch.manual_seed(7 + rank)
    vq(x)
    out["module"] = vq.codebook.detach().clone()
    lib = vk.patch(vqp.VectorQuantize(dim=4, codebook_size=_K, kmeans_init=True, kmeans_iters=_ITERS,
                                      sync_codebook=True)).eval()
    torch.manual_seed(9 + rank)
    lib(x[None])
    out["patch"] = {k: getattr(lib._codebook, k).clone() for k in ("embed", "embed_avg", "cluster_size")}
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_is_lloyd_on_the_union_from_rank_0s_sample(tmp_path):
    pytest.importorskip("vector_quantize_pytorch")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    union, n0 = torch.cat(_ddp_rows()), _SIZES[0]
    for distance in ("l2", "cosine"):
        want, counts = lloyd64(union, _initial(n0, _K, 5), _ITERS, cosine=distance == "cosine")
        for r in (r0, r1):
            torch.testing.assert_close(r[distance][0], want.float(), atol=1e-5, rtol=1e-5)
            assert torch.equal(r[distance][1], counts)
    torch.manual_seed(7)
    want, _ = lloyd64(union, torch.randperm(n0)[:_K], _ITERS)
    for r in (r0, r1):
        torch.testing.assert_close(r["module"], want.float(), atol=1e-5, rtol=1e-5)
    torch.manual_seed(9)
    means, bins = lloyd64(union, torch.randperm(n0)[:_K], _ITERS)
    smoothed = (bins + 1e-5) / (bins.sum() + _K * 1e-5) * bins.sum()  # the library's update_ema after its init
    for r in (r0, r1):
        torch.testing.assert_close(r["patch"]["cluster_size"][0], bins.float())
        torch.testing.assert_close(r["patch"]["embed_avg"][0], (means * bins[:, None]).float(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r["patch"]["embed"][0], (means * bins[:, None] / smoothed[:, None]).float(),
                                   atol=1e-5, rtol=1e-5)


_MEMORY_SCRIPT = textwrap.dedent("""
    import torch, vaekernels as vk
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    x = torch.randn(65536, 8, generator=torch.Generator().manual_seed(0))
    vk.kmeans(x[:64], 8, iters=1)  # lazy initialisation outside the measurement
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = hwm()
    codebook = vk.kmeans(x, 16384, iters=1)
    assert codebook.shape == (16384, 8) and bool(torch.isfinite(codebook).all())
    print(hwm() - base)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_memory_at_llamagen_size_stays_far_below_the_distance_matrix():
    """65536 rows x 16384 codes: the N x K float32 distances alone would be 4 GiB."""
    env = {**os.environ, "VAEKERNELS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    assert growth < 400 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB (N x K alone: 4096 MiB)"
