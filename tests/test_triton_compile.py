"""Every Triton kernel compiles for real GPUs (sm_80, sm_90), not only under the interpreter.

The interpreter runs code that the GPU compiler rejects (and has no shared-memory limit), so a green CPU run
says nothing about whether the kernels build on a GPU. This test records every launch that the Triton backend
makes for the workload covering each kernel variant (tests/kernel_variants.py: flags, dtypes, single- and
multi-program plans, small and large D, every precision, deterministic mode), then compiles each distinct
specialization to a cubin with Triton's compiler in a separate process (tests/triton_aot.py), the search kernel in
every autotuning config.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from . import kernel_variants
from .conftest import HAS_CUDA

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(HAS_CUDA, reason="a GPU runs the compiled kernels directly (tests/test_backends.py)")

import vaekernels.triton as vkt  # noqa: E402
from vaekernels import _backend  # noqa: E402

AOT = Path(__file__).with_name("triton_aot.py")
_SEARCH_PIPELINE = {"_code_stats_kernel", "_search_kernel", "_research_kernel", "_finish_kernel"}


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
    it; in deterministic mode the search's kernels still run, since the segment sums sort the indices they write, and
    IBQ's sweep always does, since the host gathers the codes of its indices."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run

    def logging_run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        launches.append({"kernel": f"{fn.__module__}.{fn.__name__}", "args": [_spec(a) for a in args],
                         "kwargs": {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}})
        if fn.__name__ in _SEARCH_PIPELINE and torch.are_deterministic_algorithms_enabled():
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)
        if fn.__module__.endswith("triton.ibq") and fn.__name__ == "_sweep_kernel":  # the host gathers its codes
            return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", logging_run)
    return launches


def _plan(launches: list[dict]) -> list[dict]:
    """One launch per compiled variant (kernel, constexprs, dtypes; int alignment hints aside), each for sm_90
    with the first autotuning config; the search kernel's float32 launches with D looped
    in tiles also for sm_80 (tensor-core lowering differs), in every config (tile shapes change the layouts), and
    LFQ's average (its tl.dot) for sm_80 too."""
    out, seen = [], set()
    for launch in launches:
        key = json.dumps([launch["kernel"], launch["kwargs"], [a.get("dtype") for a in launch["args"]]],
                         sort_keys=True)
        if key in seen:
            continue
        seen.add(key)
        kw = launch["kwargs"]
        widest = (launch["kernel"].endswith("_search_kernel") and not kw.get("ONE_D_TILE") and not kw.get("WIDE")
                  and launch["args"][0]["dtype"] == "float32")
        lfq_dot = launch["kernel"].endswith("lfq._average_kernel")  # LFQ's tf32x3 tl.dot, lowered per arch too
        lfq_dot |= ".triton.ibq." in launch["kernel"]  # and IBQ's, every kernel
        out.append({**launch, "archs": [80, 90] if widest or lfq_dot else [90], "all_configs": bool(widest)})
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
    kernel_variants.run(lambda name, *args: getattr(vkt, name)(*args), torch.device("cpu"))
    monkeypatch.undo()

    from vaekernels.triton import _common, gaussian, ibq, lfq, vq

    launched = {launch["kernel"] for launch in launches}
    every_kernel = set().union(*(_jit_kernels(m) for m in (_common, gaussian, vq, lfq, ibq)))
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
        # (64-bit division in the int64-offset variants; with Triton 3.6, the Philox normals' transcendentals)
        spills = [r for r in compiled if not r["autotuned"] and r["stack"] > 32]
        assert not spills, json.dumps(spills)
        # IBQ's kernels (no libdevice calls, tiles sized for it) spill nothing
        ibq_spills = [r for r in compiled if ".triton.ibq." in r["kernel"] and r["stack"] > 0]
        assert not ibq_spills, json.dumps(ibq_spills)
        by_variant = {}
        for r in (r for r in search if r["all_configs"]):
            by_variant.setdefault(json.dumps(r["constexprs"], sort_keys=True), []).append(r["stack"])
        # the certified search keeps its window (bound, lower and upper ends, candidate slots) per tile: its first
        # config (the untuned choice) spills nothing in any variant, and no config more than a few words
        assert by_variant and all(max(stacks) <= 32 for stacks in by_variant.values()), by_variant
        first = vq.SEARCH_CONFIGS[0].all_kwargs()
        assert not [r for r in search if r["config"] == first and r["stack"]], [r for r in search if r["stack"]]
