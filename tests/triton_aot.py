"""Compile recorded Triton launches for real GPU targets on a machine without a GPU.

Triton's interpreter (how CI runs the kernels) accepts code that the GPU compiler rejects, and says nothing about
shared memory. tests/test_triton_compile.py records every launch the ops make under the interpreter; this script,
run in a fresh process without TRITON_INTERPRET, compiles each recorded specialization down to a cubin with
Triton's own compiler (bundled ptxas) for each architecture, every autotuning config included, and reports the
shared memory each needs. Nothing is launched: a stand-in driver only names the target.

    python tests/triton_aot.py launches.json --arch 80 90 --json report.json [--shard 0/2]

A launch may name its "archs" (default: every --arch) and ask for "all_configs" of an autotuned kernel
(default: the first config only, which is what compiles the code path). The report gives each compiled
kernel's shared memory, registers and stack per thread (stack > 0: ptxas spilled registers, a speed hazard).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# shared memory per block (bytes) that a kernel may use on each architecture (CUDA programming guide)
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _driver(arch: int):
    """A driver that only tells Triton which GPU to compile for (JITFunction.warmup compiles, never launches)."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase

    class CompileOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return False

        def get_current_target(self):
            return GPUTarget("cuda", arch, 32)

        def get_current_device(self):
            return arch  # Triton caches the target per device: one stand-in device per architecture

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            import torch

            return torch.device("cpu")

        def get_benchmarker(self):
            raise RuntimeError("compile-only driver: nothing is launched")

        def map_python_to_cpp_type(self, ty):
            raise RuntimeError("compile-only driver: nothing is launched")

    return CompileOnlyDriver()


def resource_usage(cubin: bytes) -> dict:
    """Registers and stack (spilled registers) per thread, from the cuobjdump that Triton bundles."""
    import triton.backends.nvidia as nvidia

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump"),
                              "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(found[1]), "stack": int(found[2])} if found else {}


def _arg(spec):
    import torch

    return getattr(torch, spec["dtype"]) if spec["kind"] == "tensor" else spec["value"]


def compile_launch(launch: dict, arch: int) -> list[dict]:
    """Compile one recorded launch (each autotuning config of it) for `arch`; one result per compiled kernel."""
    from triton.runtime.autotuner import Autotuner

    module_name, _, name = launch["kernel"].rpartition(".")
    kernel = getattr(importlib.import_module(module_name), name)
    args = [_arg(a) for a in launch["args"]]
    kwargs = dict(launch["kwargs"])
    if isinstance(kernel, Autotuner):
        # the interpreter's single config is replaced by the configs the GPU autotuner tries
        variants = [c.all_kwargs() for c in kernel.configs]
        kwargs = {k: v for k, v in kwargs.items() if not any(k in variant for variant in variants)}
        jit, variants = kernel.fn, variants if launch.get("all_configs") else variants[:1]
    else:
        jit, variants = kernel, [{}]
    tuned = len(kernel.configs) if isinstance(kernel, Autotuner) else 0
    results = []
    for variant in variants:
        compiled = jit.warmup(*args, grid=(1,), **kwargs, **variant)
        results.append({"kernel": launch["kernel"], "arch": arch, "config": variant, "autotuned": tuned,
                        "all_configs": bool(launch.get("all_configs")),
                        "constexprs": {k: v for k, v in kwargs.items() if k.isupper()},
                        "shared": compiled.metadata.shared, "fits": compiled.metadata.shared <= SHARED_LIMIT[arch],
                        **resource_usage(compiled.asm["cubin"])})
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("launches", help="JSON list of recorded launches (tests/test_triton_compile.py)")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--json", help="write the per-kernel report here")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th launch from the i-th (parallel runs)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET: the interpreter never compiles")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from triton.runtime import driver

    shard, shards = map(int, args.shard.split("/"))
    with open(args.launches) as f:
        launches = json.load(f)[shard::shards]
    report = []
    for arch in args.arch:
        driver.set_active(_driver(arch))  # never reset: without a GPU there is no default driver to go back to
        for launch in launches:
            if arch in launch.get("archs", args.arch):
                report += compile_launch(launch, arch)
    for r in report:
        fits = "" if r["fits"] else " OVER THE LIMIT"
        print(f"sm_{r['arch']} {r['kernel'].rpartition('.')[2]} {r['constexprs']} {r['config'] or ''} "
              f"shared={r['shared']}{fits} registers={r.get('registers')} stack={r.get('stack')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
