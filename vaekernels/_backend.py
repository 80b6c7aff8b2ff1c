"""Backend registry and choice: "auto" | "torch" | "triton" | "cuda".

Every op calls `implementation(op, device, size)` at run time (inside the registered torch.library op),
so the choice follows `set_backend` / `use_backend` / VAEKERNELS_BACKEND even under torch.compile.
`set_backend` and VAEKERNELS_BACKEND set the process default; `use_backend` overrides it for the current thread
(or asyncio task) only, through a context variable, as torch.autocast and torch.no_grad do. A backend that does
not implement an op (its module's OPS) leaves that op to "auto"'s choice.
"auto" on CUDA tensors takes only the fused backends it trusts on the GPU's architecture: Triton, and CUDA once a
committed GPU run recorded it passing parity there (dispatch.json's "verified", written by bench/gpu_check.sh
first-contact). Among those it picks, per op and problem size, the one the benchmark measured fastest on that
architecture (dispatch.json's "tables", written by `python bench/run.py --dispatch`; VAEKERNELS_DISPATCH_TABLE
names another file), else CUDA, then Triton; with none, the reference.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import json
import math
import os

import torch

from . import _checks

BACKENDS = ("torch", "triton", "cuda")
_MODULES = {"torch": "vaekernels.reference", "triton": "vaekernels.triton", "cuda": "vaekernels.cuda"}
_default = _checks.choice("VAEKERNELS_BACKEND", os.environ.get("VAEKERNELS_BACKEND", "auto"), ("auto",) + BACKENDS)
_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("vaekernels_backend", default=None)


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
    """The backend choice in force in this thread: use_backend's, else the process default."""
    return _override.get() or _default


def _checked(name: str) -> str:
    _checks.choice("backend", name, ("auto",) + BACKENDS)
    if name != "auto":
        ok, why = availability(name)
        if not ok:
            raise RuntimeError(f"backend {name!r} is not available: {why}")
    return name


def set_backend(name: str) -> None:
    """Select the process-wide default backend: "auto" (fastest available per device), "torch", "triton" or "cuda".

    Inside a `use_backend` block the block's choice still wins in that thread."""
    global _default
    _default = _checked(name)


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager: run the enclosed ops of this thread (or asyncio task) with backend `name`; other threads
    keep theirs."""
    token = _override.set(_checked(name))
    try:
        yield
    finally:
        _override.reset(token)


@functools.lru_cache(maxsize=None)
def _module(name: str):
    """The backend's module; its OPS names the DISPATCH_OPS it implements."""
    return importlib.import_module(_MODULES[name])


def implementation(op: str, device: torch.device, size: tuple[int, ...] = ()):
    """The backend module that runs `op` (a DISPATCH_OPS name) of problem `size` on `device`."""
    return _module(resolve_name(op, device, size))


def resolve_name(op: str, device: torch.device, size: tuple[int, ...] = ()) -> str:
    """The name of the backend that runs `op` of problem `size` on `device` under the current choice."""
    choice = _override.get() or _default
    if choice == "auto" or op not in _module(choice).OPS:
        return _auto(op, device, size)
    if device.type != "cuda" and choice != "torch" and not (choice == "triton" and triton_interpreted()):
        raise RuntimeError(
            f"backend {choice!r} runs on CUDA tensors, got tensors on {device}; "
            "use vk.set_backend('auto') or 'torch' (or TRITON_INTERPRET=1 for the Triton interpreter)"
        )
    return choice


# the dispatch points and what their `size` is: elements for the Gaussian ops, (N rows, K codes, D) for VQ
DISPATCH_OPS = {"gaussian_fwd": ("elements",), "gaussian_bwd": ("elements",), "nearest_code": ("N", "K", "D"),
                "vq_fwd": ("N", "K", "D"), "vq_bwd": ("N", "K", "D"), "lfq_fwd": ("N", "K"), "lfq_bwd": ("N", "K"),
                "ibq_fwd": ("N", "K", "D"), "ibq_bwd": ("N", "K", "D")}
# the file of "auto"'s verification records and measured tables: the one shipped with the package, or
# VAEKERNELS_DISPATCH_TABLE, e.g. one for your own GPU written by `python bench/run.py --dispatch` and
# `python bench/dispatch.py --cuda-verified LOG` (which write to the same path)
SHIPPED_DISPATCH_TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dispatch.json")
DISPATCH_TABLE = os.environ.get("VAEKERNELS_DISPATCH_TABLE") or SHIPPED_DISPATCH_TABLE
_FUSED = ("cuda", "triton")  # the order "auto" tries on a GPU without a measured table
_NEEDS_RECORD = ("cuda",)  # fused backends "auto" takes only on architectures where a GPU run verified them


@functools.lru_cache(maxsize=None)
def _dispatch_file() -> dict:
    if not os.path.exists(DISPATCH_TABLE):
        raise FileNotFoundError(f"VAEKERNELS_DISPATCH_TABLE={DISPATCH_TABLE!r} does not exist; write one there with "
                                "`python bench/run.py --dispatch` on the GPU, or unset it for the shipped table")
    with open(DISPATCH_TABLE) as f:
        return json.load(f)


def dispatch_tables() -> dict:
    """{architecture such as "sm_90": {"device", "source", "date", "entries": [{"op", "size", "backend"}]}}."""
    return _dispatch_file()["tables"]


def verified_runs() -> dict:
    """{architecture: {backend: {"device", "date", "source", ...}}}: the GPU runs that passed parity for a backend
    (`python bench/dispatch.py --cuda-verified LOG`, run by bench/gpu_check.sh first-contact)."""
    return _dispatch_file().get("verified", {})


def trusted(name: str, arch: str) -> bool:
    """Whether "auto" may take fused backend `name` on GPU architecture `arch`: Triton always, CUDA only where
    a committed GPU run recorded it passing parity (verified_runs)."""
    return name not in _NEEDS_RECORD or name in verified_runs().get(arch, {})


def fused_order(arch: str, op: str | None = None) -> list[str]:
    """The fused backends "auto" may take on CUDA tensors of GPU architecture `arch`, in its default order: those
    available here, implementing `op` (when given) and trusted on `arch`."""
    return [name for name in _FUSED
            if availability(name)[0] and (op is None or op in _module(name).OPS) and trusted(name, arch)]


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
    arch = _arch(device.index if device.index is not None else torch.cuda.current_device())
    usable = fused_order(arch, op)
    if not usable:
        return "torch"
    return choose(op, size, arch, usable)
