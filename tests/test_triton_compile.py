"""Every Triton kernel compiles for real GPUs (sm_80, sm_90), not only under the interpreter.

The interpreter runs code that the GPU compiler rejects (and has no shared-memory limit), so a green CPU run
says nothing about whether the kernels build on a GPU. This test records every launch that the Triton backend
makes for a workload covering each kernel variant (flags, dtypes, single- and multi-program plans, small and
large D, every precision, deterministic mode), then compiles each distinct specialization to a cubin with
Triton's compiler in a separate process (tests/triton_aot.py), the search kernel in every autotuning config.
"""
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import HAS_CUDA

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="a GPU runs the compiled kernels directly (tests/test_backends.py)")

import vaekernels.triton as vkt  # noqa: E402
from vaekernels import _backend  # noqa: E402
from vaekernels.reference import philox  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AOT = Path(__file__).with_name("triton_aot.py")


def _has_ptxas() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


def _spec(a):
    if isinstance(a, torch.Tensor):
        return {"kind": "tensor", "dtype": str(a.dtype).removeprefix("torch.")}
    return {"kind": type(a).__name__, "value": a}


def _record(monkeypatch) -> list[dict]:
    """Patch the interpreter's launch to log (kernel, argument types and values, constexprs) instead of running
    it; in deterministic mode the search kernel still runs, since the segment sums sort the indices it writes."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run

    def logging_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        launches.append({"kernel": f"{fn.__module__}.{fn.__name__}", "args": [_spec(a) for a in args],
                         "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}})
        if fn.__name__ == "_search_kernel" and torch.are_deterministic_algorithms_enabled():
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", logging_run)
    return launches


def _gaussian_workload():
    """Forward and backward of every kl_mode, with and without sampling and priors, in one and many programs;
    float16 and bfloat16 on the fused sample + KL with priors."""
    for dtype in DTYPES:
        for shape in [(3, 50), (20, 1000)]:  # 150 elements: one program, direct; 20000: partial sums, reduction
            g = torch.Generator().manual_seed(0)
            mu, lv = torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)
            seed = philox.draw_seed(mu.device)
            full = dtype == torch.float32 and shape[0] > 3
            for mode in ["none", "elementwise", "sum", "latent", "sample"] if dtype == torch.float32 else ["sum"]:
                for s in [seed, None] if full and mode != "none" else [seed]:
                    priors = [(None, None), (mu, lv)] if full else [(mu, lv)]
                    for prior in priors + ([(mu, None), (None, lv)] if full and mode == "sum" else []):
                        z, kl = vkt.gaussian_forward(mu, lv, *prior, s, mode, 0.5)
                        dz = torch.ones_like(mu) if s is not None else None
                        dkl = torch.ones_like(kl) if kl is not None else None
                        vkt.gaussian_backward(dz, dkl, mu, lv, *prior, s, mode)


def _vq_workload():
    """Search with and without the epilogue and EMA sums, every precision, small and large D, channel-first
    rows, the backward with each estimator, commitment and codebook scatter, and the deterministic paths;
    float16 and bfloat16 on the forward and backward of small D."""
    one = torch.ones((), dtype=torch.float32)
    for dtype in DTYPES:
        # D in one 16- or 32-wide tile (rows kept in registers), or looped in tiles
        for d, k in [(8, 70), (32, 50), (96, 40)] if dtype == torch.float32 else [(8, 70)]:
            g = torch.Generator().manual_seed(1)
            z = torch.randn(2, d, 5, 7, generator=g).to(dtype)  # channel-first: rows read through strides
            cb = torch.randn(k, d, generator=g).to(dtype)
            full = dtype == torch.float32 and d == 8
            for precision in ["exact", "tf32", "bf16"] if dtype == torch.float32 else ["exact"]:
                if full:
                    vkt.nearest_code(z, cb, 1, precision)
                    vkt.vq_forward(z, cb, 1, precision, False)
                q, idx, *_ = vkt.vq_forward(z, cb, 1, precision, True)
            for estimator in ["ste", "rotation"] if dtype == torch.float32 else ["rotation"]:
                for dq, commit, code in [(q, one, one), (q, None, None), (None, one, one), (q, one, None)][
                        : 4 if full else 1]:
                    vkt.vq_backward(dq, z, cb, idx, commit, code, 1, estimator)
            with _deterministic():  # the search kernel runs here: the segment sums sort its indices
                q, idx, *_ = vkt.vq_forward(z, cb, 1, "exact", True)
                vkt.vq_backward(q, z, cb, idx, one, one, 1, "ste")


def _wide_workload():
    """The kernels with an int64-offset variant: the Gaussian backward (each weight shape) and the search."""
    mu = torch.randn(20, 1000)
    seed = philox.draw_seed(mu.device)
    for mode in ["elementwise", "sum", "latent", "sample"]:
        _, kl = vkt.gaussian_forward(mu, mu, None, None, seed, mode, 1.0)
        vkt.gaussian_backward(torch.ones_like(mu), torch.ones_like(kl), mu, mu, None, None, seed, mode)
    z, cb = torch.randn(2, 96, 5, 7), torch.randn(40, 96)
    for precision in ["exact", "tf32", "bf16"]:
        vkt.vq_forward(z, cb, 1, precision, True)


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def _plan(launches: list[dict]) -> list[dict]:
    """One launch per compiled variant (kernel, constexprs, dtypes; int alignment hints aside), each for sm_90
    with the first autotuning config; the search kernel's float32 launches with the full epilogue and D looped
    in tiles also for sm_80 (tensor-core lowering differs), in every config (tile shapes change the layouts)."""
    out, seen = [], set()
    for launch in launches:
        key = json.dumps([launch["kernel"], launch["kwargs"], [a.get("dtype") for a in launch["args"]]],
                         sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        kw = launch["kwargs"]
        widest = (launch["kernel"].endswith("_search_kernel") and kw.get("EPILOGUE") and kw.get("WITH_SUMS")
                  and not kw.get("ONE_D_TILE") and not kw.get("WIDE") and launch["args"][0]["dtype"] == "float32")
        out.append({**launch, "archs": [80, 90] if widest else [90], "all_configs": bool(widest)})
    return sorted(out, key=lambda launch: -launch["all_configs"])  # the heavy ones split evenly across shards


def _jit_kernels(module) -> set[str]:
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    names = set()
    for name, obj in vars(module).items():
        fn = obj.fn if isinstance(obj, Autotuner) else obj
        if isinstance(fn, InterpretedFunction) and name.endswith("_kernel"):
            names.add(f"{module.__name__}.{name}")
    return names


@pytest.mark.skipif(not _backend.triton_interpreted(), reason="records launches through Triton's interpreter")
def test_every_kernel_compiles_for_gpus(monkeypatch, tmp_path):
    if not _has_ptxas():
        pytest.skip("this Triton install has no NVIDIA backend with ptxas to compile for a GPU")
    launches = _record(monkeypatch)
    _gaussian_workload()
    _vq_workload()
    with monkeypatch.context() as m:  # the int64-offset variants, taken from 2**31 elements
        m.setattr("vaekernels.triton._common.WIDE_OFFSETS", 0)
        _wide_workload()
    monkeypatch.undo()

    from vaekernels.triton import _common, gaussian, vq

    launched = {launch["kernel"] for launch in launches}
    every_kernel = _jit_kernels(_common) | _jit_kernels(gaussian) | _jit_kernels(vq)
    assert every_kernel - launched == set(), "the workload misses kernels: add them to it"
    (tmp_path / "launches.json").write_text(json.dumps(_plan(launches)))
    # compiled kernels, every autotuning config (conftest turns autotuning off); Triton's own cache: reruns are fast
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "VAEKERNELS_AUTOTUNE": "1"}
    shards = [subprocess.Popen([sys.executable, str(AOT), str(tmp_path / "launches.json"), "--arch", "80", "90",
                                "--shard", f"{i}/2", "--json", str(tmp_path / f"report{i}.json")],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for proc in shards:
        _, err = proc.communicate()
        assert proc.returncode == 0, err[-6000:]
    report = [r for i in range(2) for r in json.loads((tmp_path / f"report{i}.json").read_text())]
    by_arch = {arch: [r for r in report if r["arch"] == arch] for arch in (80, 90)}
    assert {r["kernel"] for r in by_arch[90]} == every_kernel
    for arch, compiled in by_arch.items():
        # the search kernel's widest variants (one per precision) in every autotuning config
        search = [r for r in compiled if r["kernel"].endswith("_search_kernel")]
        assert search[0]["autotuned"] == len(vq.SEARCH_CONFIGS) and len(search) >= 3 * len(vq.SEARCH_CONFIGS)
        assert len({json.dumps(r["config"], sort_keys=True) for r in search}) == len(vq.SEARCH_CONFIGS)
        # a kernel launched with a fixed config must fit in shared memory; an autotuned one needs a fitting config
        assert all(r["fits"] for r in compiled if not r["autotuned"]), [r for r in compiled if not r["fits"]]
        assert any(r["fits"] for r in compiled if r["autotuned"])
        # register spills (ptxas stack): at most 32 bytes in fixed-config kernels, the frames of libdevice helpers
        # (64-bit division in the int64-offset variants; with Triton 3.6, the Philox normals' transcendentals), and
        # each search variant compiled in every config has a config that does not spill
        spills = [r for r in compiled if not r["autotuned"] and r["stack"] > 32]
        assert not spills, spills
        by_variant = {}
        for r in (r for r in search if r["all_configs"]):
            by_variant.setdefault(json.dumps(r["constexprs"], sort_keys=True), []).append(r["stack"])
        assert by_variant and all(min(stacks) == 0 for stacks in by_variant.values()), by_variant
