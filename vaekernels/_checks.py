"""Argument validation shared by every public entry point: one place for the error messages."""
from __future__ import annotations

import torch

REDUCTIONS = ("none", "sum", "mean", "batchmean", "per_sample")
DISTANCES = ("l2", "cosine")
PRECISIONS = ("exact", "tf32", "bf16")
ESTIMATORS = ("ste", "rotation")


def float_tensor(name: str, t) -> torch.Tensor:
    """`t` must be a floating-point tensor (float16, bfloat16, float32 or float64)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}")
    return t


def same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name_b} must have the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}")


def same_device(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.device != b.device:
        raise ValueError(f"{name_b} is on {b.device} but {name_a} is on {a.device}; move them to one device")


def choice(name: str, value, allowed: tuple) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")
    return value


def channel_dim(dim, ndim: int, name: str = "dim") -> int:
    """Normalise a possibly negative axis of a tensor with `ndim` dimensions."""
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{name} must be an int, got {type(dim).__name__}")
    if not -ndim <= dim < ndim:
        raise ValueError(f"{name}={dim} is out of range for a tensor with {ndim} dimensions")
    return dim % ndim


def free_bits(value, reduction: str) -> float:
    value = number("free_bits", value, minimum=0)
    if value > 0 and reduction != "batchmean":
        raise ValueError(f"free_bits > 0 needs reduction='batchmean', got reduction={reduction!r}")
    return float(value)


def number(name: str, value, *, minimum: float | None = None, positive: bool = False) -> float:
    """`value` must be a real number (not a bool), at least `minimum` or > 0 when asked; returned as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value}")
    return float(value)


def non_negative(name: str, value) -> float:
    return number(name, value, minimum=0)


def codebook(cb, z: torch.Tensor, dim: int) -> torch.Tensor:
    """The codebook must be a (K, D) float tensor with K >= 1 and D equal to z's size along `dim`."""
    float_tensor("codebook", cb)
    if cb.dim() != 2:
        raise ValueError(f"codebook must be 2-D (num_codes, code_dim), got shape {tuple(cb.shape)}")
    if cb.shape[0] == 0:
        raise ValueError("codebook is empty: it needs at least one code")
    if cb.shape[1] != z.shape[dim]:
        raise ValueError(
            f"codebook has code_dim {cb.shape[1]} but z has {z.shape[dim]} channels along dim={dim} (shape {tuple(z.shape)})"
        )
    same_device("z", z, "codebook", cb)
    return cb


def matrix(name: str, w, rows: int | None, cols: int | None, z: torch.Tensor) -> torch.Tensor:
    """A float [rows, cols] matrix on z's device (None: any size), or a 1x1 Conv1d weight [rows, cols, 1], squeezed."""
    float_tensor(name, w)
    if w.dim() == 3 and w.shape[-1] == 1:
        w = w.squeeze(-1)
    if w.dim() != 2 or (rows is not None and w.shape[0] != rows) or (cols is not None and w.shape[1] != cols):
        want = f"[{rows if rows is not None else 'k'}, {cols if cols is not None else 'k'}]"
        raise ValueError(f"{name} must be {want} (or a 1x1 Conv1d weight of that shape), got {list(w.shape)}")
    same_device("z", z, name, w)
    return w


def latent(z, name: str = "z") -> torch.Tensor:
    float_tensor(name, z)
    if z.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension (the code dimension), got a 0-d tensor")
    return z


def boolean(name: str, value) -> bool:
    """`value` must be a bool (not 0 or 1)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def integer(name: str, value, minimum: int = 0) -> int:
    """`value` must be an int (not a bool) of at least `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def non_empty(name: str, t: torch.Tensor) -> torch.Tensor:
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}): it needs at least one element")
    return t


def generator(g, name: str = "generator"):
    """None or a torch.Generator."""
    if g is not None and not isinstance(g, torch.Generator):
        raise TypeError(f"{name} must be a torch.Generator or None, got {type(g).__name__}")
    return g
