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
    tables = _backend.dispatch_tables()
    print("auto on CUDA tensors: " + ("; ".join(f"{arch}: {len(t['entries'])} measured op/size choices "
                                                 f"({t['device']}, {t['date'][:10]})" for arch, t in tables.items())
                                      or "no measured table yet (bench/run.py --dispatch): CUDA, then Triton"))


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
