"""Backend registry and choice: "auto" | "torch" | "triton" | "cuda".

Every op calls `implementation(device)` at run time (inside the registered torch.library op),
so the choice follows `set_backend` / `use_backend` / VAEKERNELS_BACKEND even under torch.compile.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
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


def implementation(op: str, device: torch.device):
    """The backend module that runs `op` on `device` under the current choice."""
    return _module(resolve_name(op, device))


def resolve_name(op: str, device: torch.device) -> str:
    """The name of the backend that runs `op` on `device` under the current choice."""
    if _choice == "auto":
        return _auto(op, device)
    if device.type != "cuda" and _choice != "torch" and not (_choice == "triton" and triton_interpreted()):
        raise RuntimeError(
            f"backend {_choice!r} runs on CUDA tensors, got tensors on {device}; "
            "use vk.set_backend('auto') or 'torch' (or TRITON_INTERPRET=1 for the Triton interpreter)"
        )
    return _choice


def _auto(op: str, device: torch.device) -> str:
    if device.type != "cuda":
        return "torch"
    for name in ("cuda", "triton"):
        if availability(name)[0]:
            return name
    return "torch"
