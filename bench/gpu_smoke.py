"""Smoke test of the fused backends: every kernel variant the ops launch (tests/kernel_variants.py), on tiny
inputs, each fused backend against the reference backend; stops at the first wrong op and names it.

    python bench/gpu_smoke.py [--backends triton,cuda] [--jobs N]

On a GPU it runs the compiled Triton kernels and the CUDA extension on CUDA tensors (bench/gpu_check.sh
first-contact: the smoke stage, and the sanitizer stage under compute-sanitizer memcheck); N processes (default:
up to 8) first compile the Triton kernels side by side into Triton's on-disk cache, as one process compiling the
hundred-odd variants alone would take about two minutes. Without a GPU, the Triton
kernels run through Triton's interpreter on CPU tensors (CI: tests/test_gpu_check.py) and the CUDA backend is
skipped with its reason. Test setup, tolerances and the Philox reference come from tests/conftest.py. Exit status:
0 when every variant agrees with the reference, 1 at the first that does not (or fails, or cannot run).
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import itertools
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from tests import conftest, kernel_variants  # noqa: E402  (conftest first: it sets TRITON_INTERPRET without a GPU)
from vaekernels import _backend, reference  # noqa: E402

OUTPUTS = {  # the contract's output names, for the messages
    "gaussian_forward": ("z", "kl"),
    "gaussian_backward": ("dmu", "dlogvar", "dprior_mu", "dprior_logvar"),
    "nearest_code": ("indices",),
    "vq_forward": ("quantized", "indices", "sq_err", "counts", "sums"),
    "vq_backward": ("dz", "dcodebook"),
    "lfq_forward": ("quantized", "indices", "avg", "per_sample_entropy", "commitment"),
    "lfq_backward": ("dx",),
    "ibq_forward": ("quantized", "indices", "avg", "per_sample_entropy", "quant_loss", "stats", "pc"),
    "ibq_backward": ("dz", "dcodebook"),
}
SCALE = 10  # times conftest's per-dtype tolerance, as tests/test_backends.py allows for sums and the rotation map
UNCOMPARED = "the interpreter's tl.dot on bfloat16 operands is wrong (a GPU compares them)"


class Wrong(Exception):
    """A kernel variant that disagrees with the reference, or fails: the message names backend, op and variant."""


def describe(name: str, args: tuple) -> str:
    """`name(arg=value, ...)` with tensors as dtype[shape] (and misaligned ones marked), plus the modes in force."""
    parts = []
    for key, value in _arguments(name, args).items():
        if isinstance(value, torch.Tensor):
            misaligned = " misaligned" if value.data_ptr() % 16 else ""
            value = f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}{misaligned}"
        else:
            value = repr(value)
        parts.append(f"{key}={value}")
    modes = kernel_variants.flags()
    return f"{name}({', '.join(parts)})" + (f" [{', '.join(modes)}]" if modes else "")


def _arguments(name: str, args: tuple) -> dict:
    return inspect.signature(getattr(reference, name)).bind(*args).arguments


def difference(got, want) -> str | None:
    """Why one output of a backend differs from the reference's, or None when it agrees."""
    if got is None or want is None:
        return None if got is None and want is None else f"is {got!r:.60}, the reference's {want!r:.60}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"is {got.dtype}{list(got.shape)}, the reference's {want.dtype}{list(want.shape)}"
    if not want.is_floating_point():
        wrong = (got != want).sum().item()
        return f"differs in {wrong} of {want.numel()} elements" if wrong else None
    try:
        conftest.assert_close(got, want, want.dtype, scale=SCALE)
    except AssertionError as e:
        return str(e).strip().replace("\n", "; ")
    return None


def check(backend: str, device: torch.device) -> dict[str, int]:
    """Run the workload on `backend`, each call against the reference: {"compared": calls, "uncompared": calls,
    "absent": calls of functions the backend does not implement}."""
    module = _backend._module(backend)
    interpreted = device.type == "cpu" and backend == "triton"
    counts = {"compared": 0, "uncompared": 0, "absent": 0}

    def call(name, *args):
        want = getattr(reference, name)(*args)
        if not hasattr(module, name):  # an op the backend leaves to "auto" (the CUDA extension's LFQ)
            counts["absent"] += 1
            return want
        try:
            got = getattr(module, name)(*args)
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # an asynchronous kernel error belongs to this call
        except Exception as e:  # noqa: BLE001 - a failing variant is a finding: name it
            raise Wrong(f"{backend} {describe(name, args)}: {type(e).__name__}: {e}") from e
        if interpreted and _arguments(name, args).get("precision") == "bf16":
            counts["uncompared"] += 1
            return want
        for output, g, w in zip(OUTPUTS[name], _tuple(got), _tuple(want)):
            problem = difference(g, w)
            if problem:
                raise Wrong(f"{backend} {describe(name, args)}: {output} {problem}")
        counts["compared"] += 1
        return want

    with conftest.philox_reference():  # on CPU tensors the reference samples the kernels' Philox stream too
        kernel_variants.run(call, device)
    return counts


def warm(shard: int, shards: int, device: torch.device) -> None:
    """Run the Triton backend on the workload's calls number shard, shard + shards, ... (the others on the reference
    alone, whose outputs feed later calls): this fills Triton's on-disk cache for the check, which reports any
    error itself, so errors are ignored here."""
    module = _backend._module("triton")
    numbers = itertools.count()

    def call(name, *args):
        if next(numbers) % shards == shard:
            with contextlib.suppress(Exception):
                getattr(module, name)(*args)
        return getattr(reference, name)(*args)

    with conftest.philox_reference():
        kernel_variants.run(call, device)


def compile_side_by_side(jobs: int, limit_s: float = 75.0) -> str:
    """`jobs` processes warm Triton's cache, each a shard of the calls; any still running after `limit_s` stop."""
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), "--warm", f"{i}/{jobs}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for i in range(jobs)]
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, limit_s - (time.perf_counter() - start)))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return f"compiled the Triton kernels in {jobs} processes ({time.perf_counter() - start:.1f} s)"


def _tuple(outputs) -> tuple:
    return outputs if isinstance(outputs, tuple) else (outputs,)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="triton,cuda", help="comma list of fused backends (default: both)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="processes that first compile the Triton kernels side by side, on a GPU (1: none)")
    parser.add_argument("--warm", metavar="I/N", help=argparse.SUPPRESS)  # one of those processes
    args = parser.parse_args(argv)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    if args.warm:
        warm(*map(int, args.warm.split("/")), device)
        return 0
    where = f"{torch.cuda.get_device_name()} ({_backend._arch(torch.cuda.current_device())})" if gpu else "the CPU"
    print(f"smoke test on {where}: every kernel variant against the reference", flush=True)
    for backend in args.backends.split(","):
        ok, why = _backend.availability(backend)
        if not ok:
            if gpu:
                print(f"FAILED {backend}: the backend is unavailable on this GPU: {why}")
                return 1
            print(f"{backend}: skipped ({why})")
            continue
        if gpu and backend == "triton" and args.jobs > 1:
            print(compile_side_by_side(args.jobs), flush=True)
        start = time.perf_counter()
        try:
            counts = check(backend, device)
        except Wrong as e:
            print(f"FAILED {e}")
            return 1
        print(f"{backend}: {counts['compared']} calls, every kernel variant, agree with the reference "
              f"({time.perf_counter() - start:.1f} s{', compiles included' if gpu and backend == 'triton' else ''})"
              + (f"; {counts['uncompared']} calls with precision='bf16' ran uncompared: {UNCOMPARED}"
                 if counts["uncompared"] else "")
              + (f"; {counts['absent']} calls of ops it leaves to the reference" if counts["absent"] else ""),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
