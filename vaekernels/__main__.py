"""`python -m vaekernels info` (version, backends and why not, build, versions) | `python -m vaekernels demo`."""
from __future__ import annotations

import sys


def info() -> None:
    import platform

    import torch

    import vaekernels
    from vaekernels import _backend, cuda

    print(f"vaekernels {vaekernels.__version__} (python {platform.python_version()})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}, "
          f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton not installed")
    print(f"backend choice: {_backend.get_backend()}")
    for name in _backend.BACKENDS:
        ok, why = _backend.availability(name)
        print(f"  {name:7s} {'available' if ok else 'unavailable'}: {why}")
    build = cuda.build_info()
    print("CUDA extension: " + ", ".join(f"{k}={v}" for k, v in build.items()))
    for line in auto_summary(_backend._arch(torch.cuda.current_device()) if torch.cuda.is_available() else None):
        print(line)


def auto_summary(arch: str | None) -> list[str]:
    """Which backend "auto" prefers on CUDA tensors and why: on this GPU's architecture `arch`, or (None: no GPU
    here) on the architectures where CUDA was verified and elsewhere; then the measured tables."""
    from vaekernels import _backend

    verified = {a: runs["cuda"] for a, runs in _backend.verified_runs().items() if "cuda" in runs}

    def record(a):
        r = verified[a]
        return f"{r['device']}, {r['date'][:10]}, {r['source']}"

    if arch is None:
        lines = [f"auto on CUDA tensors of {a}: cuda (verified: {record(a)}), then triton, then torch"
                 for a in verified]
        lines.append(f"auto on CUDA tensors{' elsewhere' if verified else ''}: triton, then torch (cuda: unverified; "
                     "`bash bench/gpu_check.sh first-contact` verifies it on a GPU)")
    else:
        cuda = f"verified on {arch} ({record(arch)})" if arch in verified else f"unverified on {arch}"
        if arch in verified and not _backend.availability("cuda")[0]:
            cuda += " but unavailable here"
        lines = [f"auto on CUDA tensors: cuda: {cuda}, auto prefers {(_backend.fused_order(arch) + ['torch'])[0]}"]
    tables = _backend.dispatch_tables()
    lines.append("measured tables (between verified backends): " + (
        "; ".join(f"{a}: {len(t['entries'])} op/size choices ({t['device']}, {t['date'][:10]})"
                  for a, t in tables.items()) or "none yet (bench/run.py --dispatch)"))
    return lines


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("info", "demo"):
        print("usage: python -m vaekernels info | demo [--steps N] [--out DIR] [--device cpu|cuda]")
        sys.exit(2)
    if argv[0] == "info":
        info()
    else:
        from .demo import main as demo

        demo(argv[1:])


if __name__ == "__main__":
    main()
