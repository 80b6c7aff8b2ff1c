"""Micro-benchmarks with pytest-benchmark: `pytest bench/ --benchmark-only` (compare runs with --benchmark-autosave
and --benchmark-compare).

Small shapes (the --quick sets of bench/shapes.py but the headline figures), every op and mode, for the eager
formula, each vaekernels backend that runs natively here and, on a GPU, torch.compile of the eager formula. The
cases and steps are bench/run.py's, so the two always measure the same thing; on a GPU each timed call ends with
a synchronisation.
"""
from __future__ import annotations

import pytest
import torch

import _measure
import run
import vaekernels as vk
from shapes import OPS, QUICK_SETS, shape_sets

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
PLAN = run.Plan.make(DEVICE, quick=True)
SETS = {name: s for name, s in shape_sets("quick").items() if name in QUICK_SETS and not s.baseline_only}
CASES = run.cases(SETS, OPS)
NAMES = ["eager", "vaekernels[cuda]", "vaekernels[triton]", "vaekernels[torch]"]
if DEVICE.type == "cuda":
    NAMES.append("torch.compile")  # on the CPU compiling takes longer than the whole suite


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.op}-{c.mode}-{c.set.name}")
def test_op(benchmark, case, name):
    competitor = run.BY_NAME[name]
    missing = competitor.unavailable(DEVICE)
    if missing:
        pytest.skip(missing[1])
    benchmark.group = f"{case.op} {case.mode} {case.shape.label}"
    with vk.use_backend(competitor.backend):
        try:
            step = run.build_step(case, PLAN, competitor)
        except run.Skip as e:
            pytest.skip(str(e))

        def synchronised_step():
            step()
            _measure.sync(DEVICE)

        synchronised_step()  # warm-up: compilation and lazy initialisation stay out of the timings
        benchmark(synchronised_step)
