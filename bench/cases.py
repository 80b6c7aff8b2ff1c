"""What the benchmark measures: the plan (where and how long), the cases (op and mode on one shape of a named set,
bench/shapes.py) and their fresh inputs, and the list of comparisons (case, competitor) a run makes."""
from __future__ import annotations

import dataclasses

import torch

from shapes import MODES, Codes, Latent, ShapeSet


class Skip(Exception):
    """A comparison that does not apply here; `status` is "skipped" or "not installed"."""

    def __init__(self, note: str, status: str = "skipped"):
        super().__init__(note)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where and how long to measure."""

    device: torch.device
    size: str  # "gpu" | "cpu" | "quick" (shapes.SIZES)
    budget_s: float  # timing budget per comparison
    min_runs: int
    max_runs: int
    timeout_s: float  # per comparison, CPU children only
    cpu_compile: bool = False  # run torch.compile on the CPU too (first shape of each set)

    @classmethod
    def make(cls, device: torch.device, quick: bool, timeout_s: float | None = None, cpu_compile: bool = False):
        if quick:
            return cls(device, "quick", 0.05, 1, 3, timeout_s or 120, cpu_compile)
        if device.type == "cuda":
            return cls(device, "gpu", 0.1, 10, 200, timeout_s or 600)
        return cls(device, "cpu", 1.0, 3, 30, timeout_s or 900, cpu_compile)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement target: op and mode on one shape of a set (`index`: its position in the set)."""

    op: str
    mode: str
    set: ShapeSet
    shape: Latent | Codes
    index: int

    def describe(self) -> str:
        return f"{self.op} {self.mode} {self.set.name} {self.shape.label}"


# ------------------------------------------------------------------ a case's fresh inputs (after torch.manual_seed)


def latents(case: Case, device) -> tuple[torch.Tensor, torch.Tensor]:
    """mu and logvar of the case's shape (leaves with gradients in fwdbwd)."""
    grad = case.mode == "fwdbwd"
    mu = torch.randn(case.shape.shape, device=device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(case.shape.shape, device=device)).requires_grad_(grad)
    return mu, logvar


def vq_input(case: Case, device) -> torch.Tensor:
    """z of the case's shape, channels on the shape's `dim`."""
    return torch.randn(case.shape.shape, device=device).requires_grad_(case.mode == "fwdbwd")


def codebook_input(case: Case, device) -> torch.Tensor:
    s = case.shape
    return torch.randn(s.codes, s.d, device=device).requires_grad_(case.mode == "fwdbwd")


def rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    """z as (N, D) rows."""
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


def is_image(shape: Codes) -> bool:
    """An NCHW feature map (channels on dim 1)."""
    return len(shape.shape) == 4 and shape.dim == 1


# ------------------------------------------------------------------ what a run measures


def cases(sets: dict[str, ShapeSet], ops: tuple[str, ...]) -> list[Case]:
    """Every (op, mode) the sets run on each of their shapes."""
    return [Case(op, mode, s, shape, i) for s in sets.values() for i, shape in enumerate(s.shapes)
            for op in ops for mode in MODES if s.runs(op, mode)]


def comparisons(all_cases: list[Case], competitors: tuple) -> list[tuple]:
    """(case, competitor) for each competitor that covers the case's op; a `baseline_only` set runs only eager and
    vaekernels."""
    return [(case, c) for case in all_cases for c in competitors
            if case.op in c.ops and (c.is_baseline or not case.set.baseline_only)]

