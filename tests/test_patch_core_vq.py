"""vk.patch on the EnCodec lineage's residual quantizers (core_vq.py in encodec, audiocraft and speechtokenizer),
against the installed packages: three training steps from the same random state, patched and original.

encodec imports torchaudio at import time; where torchaudio does not import (it has no build for every torch),
tests/audio_peers.py imports encodec's core_vq with a stand-in torchaudio module, and audiocraft's and
speechtokenizer's without their package __init__ (see there).
"""
import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

import vaekernels as vk
from . import audio_peers
from .doubles.compare import OpCalls, assert_trains_the_same

DIM, BINS = 16, 32


def _expires(rvq, make_input, call):
    """Whether a dead code is replaced in the first training steps of the original (level 0)."""
    probe = copy.deepcopy(rvq)
    cb = probe.layers[0]._codebook
    torch.manual_seed(0)
    fired = False
    for _ in range(3):
        call(probe, make_input())
        fired |= bool(cb.inited) and bool((cb.cluster_size < cb.threshold_ema_dead_code).any())
    return fired


def _rvq(lib, **kwargs):
    config = dict(num_quantizers=3, dim=DIM, codebook_size=BINS, decay=0.8, kmeans_iters=5,
                  threshold_ema_dead_code=2)
    config.update(kwargs)
    torch.manual_seed(1)
    return lib.ResidualVectorQuantization(**config)


def _input(rows=24):
    return lambda: torch.randn(2, DIM, rows)


CONFIGS = {
    "kmeans_init": dict(kmeans_init=True),
    "random_init": dict(kmeans_init=False),
    "fewer_rows_than_codes": dict(kmeans_init=True, rows=8),
    "projection_no_expiry": dict(kmeans_init=True, codebook_dim=8, threshold_ema_dead_code=0),
}


@pytest.mark.parametrize("package", ["encodec", "speechtokenizer"])
@pytest.mark.parametrize("name", CONFIGS)
def test_residual_vector_quantization(package, name):
    lib = audio_peers.load(package)
    config = dict(CONFIGS[name])
    make_input = _input(config.pop("rows", 24))
    build = lambda: _rvq(lib, **config)  # noqa: E731
    call = (lambda m, x: m(x, layers=[0, 2])) if package == "speechtokenizer" else (lambda m, x: m(x))
    if config.get("threshold_ema_dead_code", 2):
        assert _expires(build(), make_input, call)
    assert_trains_the_same(build, make_input, call)


def test_encodec_n_q_and_encode_decode():
    lib = audio_peers.load("encodec")
    rvq, patched = assert_trains_the_same(lambda: _rvq(lib, kmeans_init=True), _input(), lambda m, x: m(x, n_q=2))
    x = torch.randn(2, DIM, 24)
    with OpCalls() as calls:
        codes = patched.encode(x)
    assert "vaekernels::nearest_code" in calls.names
    torch.testing.assert_close(codes, rvq.encode(x))
    torch.testing.assert_close(patched.decode(codes), rvq.decode(codes))


def test_audiocraft_quantizer_with_dropout():
    """audiocraft detaches each level, returns codes as [B, K, T] and draws q_dropout's depth from the CPU
    generator; those are its own code around the patched codebook."""
    audio_peers.load("audiocraft")
    vq = sys.modules["audiocraft.quantization.vq"]

    def build():
        torch.manual_seed(1)
        return vq.ResidualVectorQuantizer(dimension=DIM, n_q=4, q_dropout=True, bins=BINS, decay=0.8,
                                          kmeans_init=True, kmeans_iters=5, threshold_ema_dead_code=2)

    assert_trains_the_same(build, _input(), lambda m, x: m(x, frame_rate=50), steps=4)


@pytest.mark.parametrize("config", [dict(channels_last=True), dict(orthogonal_reg_weight=0.5),
                                    dict(orthogonal_reg_weight=0.5, orthogonal_reg_active_codes_only=True,
                                         orthogonal_reg_max_codes=8)])
def test_audiocraft_options(config):
    lib = audio_peers.load("audiocraft")
    """channels_last runs fused; the orthogonal regulariser keeps VectorQuantization's own forward (with a warning
    naming it) around the fused codebook."""
    make_input = (lambda: torch.randn(2, 24, DIM)) if config.get("channels_last") else _input()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_trains_the_same(lambda: _rvq(lib, kmeans_init=True, **config), make_input, lambda m, x: m(x))
    named = [w for w in caught if "orthogonal_reg_weight > 0" in str(w.message)]
    assert bool(named) == ("orthogonal_reg_weight" in config), [str(w.message) for w in caught]


CLASS_LEVEL = {  # package: (class, op, a training forward)
    "encodec": ("EuclideanCodebook", "vq_fwd", lambda lib: _rvq(lib, kmeans_init=True)(torch.randn(2, DIM, 24))),
    "audiocraft": ("EuclideanCodebook", "vq_fwd", lambda lib: _rvq(lib)(torch.randn(2, DIM, 24))),
    "speechtokenizer": ("EuclideanCodebook", "vq_fwd", lambda lib: _rvq(lib)(torch.randn(2, DIM, 24))),
    "dac": ("VectorQuantize", "nearest_code", lambda lib: lib.VectorQuantize(DIM, BINS, 8)(torch.randn(2, DIM, 12))),
    "snac": ("VectorQuantize", "nearest_code",
             lambda lib: lib.VectorQuantize(DIM, BINS, 8, stride=2)(torch.randn(2, DIM, 12))),
}


@pytest.mark.parametrize("package", CLASS_LEVEL)
def test_class_level_patch_and_unpatch(package):
    """vk.patch("encodec" | "audiocraft" | "speechtokenizer" | "dac" | "snac"), then vk.unpatch."""
    lib = audio_peers.load(package)
    class_name, op, run = CLASS_LEVEL[package]
    klass = getattr(lib, class_name)
    original = klass.forward
    vk.patch(package)
    try:
        with OpCalls() as calls:
            run(lib)
        assert f"vaekernels::{op}" in calls.names and klass._vaekernels_patched
    finally:
        vk.unpatch(package)
    assert klass.forward is original and "_vaekernels_patched" not in vars(klass)


def test_kmeans_init_buffers():
    """embed = embed_avg = means (not means x bins), cluster_size = counts of the last iteration, inited set."""
    lib = audio_peers.load("encodec")
    torch.manual_seed(0)
    cb = lib.EuclideanCodebook(DIM, BINS, kmeans_init=True, kmeans_iters=4)
    patched = vk.patch(copy.deepcopy(cb))
    data = torch.randn(100, DIM)
    for m in (cb, patched):
        torch.manual_seed(3)
        m.init_embed_(data)
    torch.manual_seed(3)
    means, bins = lib.kmeans(data, BINS, 4)
    torch.testing.assert_close(patched.state_dict(), cb.state_dict())
    torch.testing.assert_close(patched.embed_avg, means)
    torch.testing.assert_close(patched.cluster_size, bins.float())
    assert patched.inited.item() == 1.0


_MEMORY_SCRIPT = textwrap.dedent("""
    import torch, vaekernels as vk
    from tests import audio_peers
    lib = audio_peers.load("encodec")
    def hwm():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    x = torch.randn(2400, 128, generator=torch.Generator().manual_seed(0))
    vk.patch(lib.EuclideanCodebook(128, 16, kmeans_init=True, kmeans_iters=1)).init_embed_(x[:64])  # warm-up
    cb = vk.patch(lib.EuclideanCodebook(128, 1024, kmeans_init=True, kmeans_iters=50))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    base = hwm()
    cb.init_embed_(x)
    assert bool(cb.inited) and bool(torch.isfinite(cb.embed).all()) and int(cb.cluster_size.sum()) == 2400
    print(hwm() - base)
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc/self/clear_refs")
def test_kmeans_init_memory_at_encodec_size():
    """EnCodec 24 kHz, 16 x 2 s: 2400 rows x 128 dims, 1024 codes, 50 iterations; the original's N x K x D
    difference tensor alone is 1.2 GiB."""
    audio_peers.load("encodec")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "VAEKERNELS_BACKEND": "torch"}
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT], capture_output=True, text=True, timeout=300,
                          env=env, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    growth = int(proc.stdout.split()[-1])
    assert growth <= 64 * 2**20, f"peak RSS grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("package, broadcasts", [("encodec", True), ("audiocraft", True), ("speechtokenizer", False)])
def test_kmeans_init_broadcasts_where_the_package_does(package, broadcasts, monkeypatch):
    """encodec and audiocraft broadcast every buffer from rank 0 after the init; speechtokenizer's call is
    commented out."""
    lib = audio_peers.load(package)
    sent = []
    for name, value in (("is_available", lambda: True), ("is_initialized", lambda: True),
                        ("get_world_size", lambda: 2), ("broadcast", lambda t, src: sent.append(t))):
        monkeypatch.setattr(torch.distributed, name, value)
    cb = vk.patch(lib.EuclideanCodebook(DIM, BINS, kmeans_init=True, kmeans_iters=2))
    cb.init_embed_(torch.randn(64, DIM))
    assert [t.data_ptr() for t in sent] == ([t.data_ptr() for t in cb.buffers()] if broadcasts else [])


def _ddp_worker(rank, world, init_file, out_dir):
    """Per package, original and patched, each rank on its own data and random state: the buffers after a bare
    k-means init, and after each of two training steps of a 2-level RVQ (init, dead-code expiry firing)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    x = torch.randn(2, DIM, 24, generator=torch.Generator().manual_seed(10 + rank))
    for package in ("encodec", "speechtokenizer"):
        lib = audio_peers.load(package)
        for name in ("original", "patched"):
            patch = vk.patch if name == "patched" else (lambda m: m)
            cb = patch(lib.EuclideanCodebook(DIM, BINS, kmeans_init=True, kmeans_iters=5))
            torch.manual_seed(20 + rank)
            cb.init_embed_(x.transpose(1, 2).reshape(-1, DIM))
            states = [{k: v.clone() for k, v in cb.state_dict().items()}]
            rvq = patch(_rvq(lib, num_quantizers=2, kmeans_init=True, threshold_ema_dead_code=3)).train()
            torch.manual_seed(30 + rank)
            for _ in range(2):
                rvq(x)
                states.append({k: v.clone() for k, v in rvq.state_dict().items()})
            out[package, name] = states
    torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_train_as_the_original_with_its_broadcasts(tmp_path):
    """Under torch.distributed (2 gloo ranks, different data), every buffer on every rank equals the original's:
    the k-means init is rank 0's on both ranks where the package broadcasts it (encodec) and each rank's own where
    it does not (speechtokenizer); training steps keep the packages' expiry draws and broadcasts."""
    for package in ("encodec", "speechtokenizer"):
        audio_peers.load(package)
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in (0, 1)]
    for out in ranks:
        for package in ("encodec", "speechtokenizer"):
            torch.testing.assert_close(out[package, "patched"], out[package, "original"], rtol=1e-5, atol=1e-5)
    for package, broadcast in (("encodec", True), ("speechtokenizer", False)):
        inits = [out[package, "patched"][0]["embed"] for out in ranks]
        assert torch.equal(*inits) == broadcast, package
