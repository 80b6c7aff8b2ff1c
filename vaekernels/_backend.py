"""Backend registry and choice: "auto" | "torch" | "triton" | "cuda".

Every op calls `implementation(op, device, size)` at run time (inside the registered torch.library op),
so the choice follows `set_backend` / `use_backend` / VAEKERNELS_BACKEND even under torch.compile.
"auto" on CUDA tensors picks, per op and problem size, the backend the benchmark measured fastest on this GPU
architecture (dispatch.json, written by `python bench/run.py --dispatch`; VAEKERNELS_DISPATCH_TABLE names
another), else CUDA, then Triton.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os

import torch

from . import _checks

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "vaekernels.reference", "triton": "vaekernels.triton", "cuda": "vaekernels.cuda"}
_choice = _checks.choice("VAEKERNELS_BACKEND", os.environ.get("VAEKERNELS_BACKEND", "auto"), ("auto",) + BACKENDS)


def triton_interpreted() -> bool:
    """True when Triton kernels run on CPU tensors through Triton's interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def availability(name: str) -> tuple[bool, str]:
    """(available, reason) for one backend; the reason says why not, or on what it runs."""
    _checks.choice("backend", name, BACKENDS)
    if name == "torch":
        return True, "pure PyTorch, runs on every device"
    if name == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            return False, f"triton is not installed ({e})"
        if triton_interpreted():
            return True, "Triton interpreter on CPU tensors (TRITON_INTERPRET=1)"
        if not torch.cuda.is_available():
            return False, "no CUDA device visible to PyTorch (set TRITON_INTERPRET=1 to run the kernels on the CPU)"
        return True, f"CUDA device {torch.cuda.get_device_name()}"
    from . import cuda

    return cuda.availability()


def available_backends() -> list[str]:
    """Names of the backends that can run here."""
    return [b for b in BACKENDS if availability(b)[0]]


def get_backend() -> str:
    return _choice


def set_backend(name: str) -> None:
    """Select the backend for all ops: "auto" (fastest available per device), "torch", "triton" or "cuda"."""
    global _choice
    _checks.choice("backend", name, ("auto",) + BACKENDS)
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    _choice = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed ops with backend `name`, then restore the previous choice."""
    previous = get_backend()
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _module(name: str):
    return importlib.import_module(_MODULES[name])


def implementation(op: str, device: torch.device, size: tuple[int, ...] = ()):
    """The backend module that runs `op` (a DISPATCH_OPS name) of problem `size` on `device`."""
    return _module(resolve_name(op, device, size))


def resolve_name(op: str, device: torch.device, size: tuple[int, ...] = ()) -> str:
    """The name of the backend that runs `op` of problem `size` on `device` under the current choice."""
    if _choice == "auto":
        return _auto(op, device, size)
    if device.type != "cuda" and _choice != "torch" and not (_choice == "triton" and triton_interpreted()):
        raise RuntimeError(
            f"backend {_choice!r} runs on CUDA tensors, got tensors on {device}; "
            "use vk.set_backend('auto') or 'torch' (or TRITON_INTERPRET=1 for the Triton interpreter)"
        )
    return _choice


# the dispatch points and what their `size` is: elements for the Gaussian ops, (N rows, K codes, D) for VQ
DISPATCH_OPS = {"gaussian_fwd": ("elements",), "gaussian_bwd": ("elements",), "nearest_code": ("N", "K", "D"),
                "vq_fwd": ("N", "K", "D"), "vq_bwd": ("N", "K", "D")}
# the measured table "auto" reads: the one shipped with the package, or VAEKERNELS_DISPATCH_TABLE, e.g. a table
# measured on your own GPU by `python bench/run.py --dispatch` (which writes to the same path)
SHIPPED_DISPATCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")
DISPATCH_TABLE = os.environ.get("VAEKERNELS_DISPATCH_TABLE") or SHIPPED_DISPATCH_TABLE
_FUSED = ("cuda", "triton")  # the order "auto" tries on a GPU without a measured table


@functools.lru_cache(maxsize=None)
def dispatch_tables() -> dict:
    """{architecture such as "sm_90": {"device", "source", "date", "entries": [{"op", "size", "backend"}]}}."""
    if not os.path.exists(DISPATCH_TABLE):
        raise FileNotFoundError(f"VAEKERNELS_DISPATCH_TABLE={DISPATCH_TABLE!r} does not exist; write one there with "
                                "`python bench/run.py --dispatch` on the GPU, or unset it for the shipped table")
    with open(DISPATCH_TABLE) as f:
        return json.load(f)["tables"]


def choose(op: str, size: tuple[int, ...], arch: str, usable: list[str]) -> str:
    """The backend of the measured entry nearest to `size` (log-scale distance) for `op` on `arch`, if usable;
    else the first of `usable`."""
    entries = [e for e in dispatch_tables().get(arch, {}).get("entries", ()) if e["op"] == op]
    if entries and size:
        def distance(entry):
            return sum(abs(math.log2(max(a, 1) / max(b, 1))) for a, b in zip(entry["size"], size))

        best = min(entries, key=distance)["backend"]
        if best in usable:
            return best
    return usable[0]


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> str:
    return "sm_%d%d" % torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=4096)
def _auto(op: str, device: torch.device, size: tuple[int, ...]) -> str:
    if device.type != "cuda":
        return "torch"
    usable = [name for name in _FUSED if availability(name)[0]]
    if not usable:
        return "torch"
    index = device.index if device.index is not None else torch.cuda.current_device()
    return choose(op, size, _arch(index), usable)
