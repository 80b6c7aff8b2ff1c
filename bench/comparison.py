"""Running comparisons: one training-style step of a competitor on a case, measured in a forked child on the CPU
(bench/_measure.py: timing and peak memory) or in-process on a GPU; the rows of results with their speedup,
memory ratio and bandwidth or FLOP/s against the device; and the whole-run measurements (kernel launch counts,
the two headline figures)."""
from __future__ import annotations

import gc
from typing import Callable

import torch

import _measure
import vaekernels as vk
from cases import Case, Plan, Skip
from competitors import Competitor
from shapes import HEADLINE_SET, Codes, Latent, ShapeSet

# ------------------------------------------------------------------ running one comparison


def make_step(forward: Callable, leaves: list, mode: str) -> Callable[[], None]:
    """One training-style step: forward under no_grad ("fwd"), or forward then backward with ones as the
    upstream gradient of every output ("fwdbwd"; leaves' gradients are dropped first, not accumulated)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()

        return step
    grads: list[torch.Tensor] = []

    def step():
        for t in leaves:
            t.grad = None
        outputs = forward()
        if not grads:
            grads.extend(torch.ones_like(o) for o in outputs)
        torch.autograd.backward(outputs, grads)

    return step


def build_step(case: Case, plan: Plan, competitor: Competitor) -> Callable[[], None]:
    """The step for one comparison, or Skip when it does not apply (memory guard included)."""
    if competitor.dense and isinstance(case.shape, Codes):
        budget = _measure.memory_budget(plan.device)
        if case.shape.dense_bytes > budget:
            raise Skip(f"would need {case.shape.dense_bytes / _measure.GiB:.1f} GiB (N*K*4 bytes*3), over the "
                       f"{budget / _measure.GiB:.1f} GiB this machine can give a case")
    torch.manual_seed(0)
    forward, leaves = competitor.build(case, plan, competitor)
    return make_step(forward, leaves, case.mode)


def run_comparison(case: Case, competitor: Competitor, plan: Plan) -> dict:
    """Measure one comparison; every failure becomes a status and a note."""
    try:
        with vk.use_backend(competitor.backend):
            step = build_step(case, plan, competitor)
            return {"status": "ok", **_measure.measure(step, plan.device, plan.budget_s, plan.min_runs, plan.max_runs)}
    except Skip as e:
        return {"status": e.status, "note": str(e)}
    except Exception as e:  # noqa: BLE001 - fail soft: the error is the result of this comparison
        return {"status": "error", "note": f"{type(e).__name__}: {e}".strip()}


def execute(fn: Callable, args: tuple, plan: Plan) -> dict:
    """fn(*args) in a forked child on the CPU (fresh peak RSS, memory cap, time limit), in-process on a GPU
    (then its tensors are freed and the cache emptied, so the next case's memory guard sees the free memory)."""
    if plan.device.type == "cuda":
        result = fn(*args)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    return _measure.isolated(fn, args, plan.timeout_s, memory_limit=_measure.memory_budget(plan.device))



def row(case: Case, competitor: Competitor, result: dict) -> dict:
    """One comparison's JSON row: what was measured (op, mode, set, shape, sizes) and its result."""
    s = case.shape
    row = {"op": case.op, "mode": case.mode, "set": case.set.name, "shape": s.label, "index": case.index,
           "competitor": competitor.name, "backend": competitor.backend, "precision": competitor.precision}
    if isinstance(s, Latent):
        row.update(dims=list(s.shape), size=s.numel, bytes=s.numel * 4 * ELEMENT_TRAFFIC[case.op, case.mode])
    else:
        row.update(dims={"shape": list(s.shape), "dim": s.dim, "N": s.n, "D": s.d, "K": s.codes, "Q": s.stages},
                   size=s.search_flops(case.op), flops=s.search_flops(case.op))
    return {**row, **result}


# minimal float32 tensors moved per element (design.md, "Performance model"): reparameterize reads mu, logvar and
# writes z, its backward reads dz, logvar and writes dlogvar (dmu is dz); the KL reads mu, logvar, its backward
# also writes dmu, dlogvar; fused, the backward reads dz, mu, logvar and writes dmu, dlogvar
ELEMENT_TRAFFIC = {
    ("reparameterize", "fwd"): 3, ("reparameterize", "fwdbwd"): 6,
    ("gaussian_kl", "fwd"): 2, ("gaussian_kl", "fwdbwd"): 6,
    ("reparameterize_kl", "fwd"): 3, ("reparameterize_kl", "fwdbwd"): 8,
}


def annotate(rows: list[dict], copy_bw: float | None, peaks: dict | None) -> None:
    """Add speedup and memory ratio against eager, bandwidth % of the measured copy, search FLOP/s % of peak."""
    base = {(r["op"], r["mode"], r["set"], r["shape"]): r for r in rows
            if r["competitor"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        seconds = r["times_ms"]["median"] / 1e3
        b = base.get((r["op"], r["mode"], r["set"], r["shape"]))
        r["speedup"] = b["times_ms"]["median"] / r["times_ms"]["median"] if b else None
        ok_mem = b and b["peak_bytes"] and r["peak_bytes"] is not None
        r["memory_ratio"] = r["peak_bytes"] / b["peak_bytes"] if ok_mem else None
        if "bytes" in r:
            r["bandwidth_gbps"] = r["bytes"] / seconds / 1e9
            r["bandwidth_pct"] = 100 * r["bytes"] / seconds / copy_bw if copy_bw else None
        else:
            r["tflops"] = r["flops"] / seconds / 1e12
            peak = peaks and peaks["tf32" if r["precision"] == "tf32" else "fp32"]
            r["peak_pct"] = 100 * r["tflops"] / peak if peak else None


# ------------------------------------------------------------------ whole-run measurements


def copy_bandwidth(device: torch.device) -> dict:
    """The device's measured copy bandwidth (what the elementwise ops' bandwidth is a percentage of)."""
    return {"status": "ok", "bytes_per_s": _measure.copy_bandwidth(device), "threads": torch.get_num_threads()}


LAUNCH_CASE = ("reparameterize_kl", Latent((64, 128)))


def launch_counts(plan: Plan, competitors: tuple[Competitor, ...]) -> dict:
    """Kernels launched by one forward+backward of reparameterize_kl on 64x128 latents (GPU only)."""
    if plan.device.type != "cuda":
        return {"note": "n/a (CPU: no kernel launches)"}
    op, shape = LAUNCH_CASE
    case = Case(op, "fwdbwd", ShapeSet("launches", "kernel launch count", (shape,)), shape, 0)
    counts = {}
    for c in competitors:
        if op not in c.ops or not (c.is_baseline or c.name == "torch.compile"):
            continue
        missing = c.unavailable(plan.device)
        if missing:
            counts[c.name] = {"status": missing[0], "note": missing[1]}
            continue
        try:
            with vk.use_backend(c.backend):
                step = build_step(case, plan, c)
                for _ in range(3):
                    step()
                counts[c.name] = {"status": "ok", **_measure.count_kernels(step)}
        except Exception as e:  # noqa: BLE001
            counts[c.name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
    return {"case": f"{op} fwdbwd {shape.label}", "counts": counts}


# what the two headline figures must show, in the reports' words
HEADLINE_TARGETS = {
    "speed": "target: at least as fast as eager, at most 15% of eager's peak memory",
    "memory": "target: peak memory under 1 GiB",
}


def headline_figures(rows: list[dict]) -> dict:
    """The two headline figures, from the rows of the `headline` set (bench/shapes.py): time and peak memory of
    vaekernels and eager on vector_quantize fwd+bwd at its first shape ("speed") and its second ("memory")."""
    sel = [r for r in rows if r["set"] == HEADLINE_SET and r["op"] == "vector_quantize" and r["mode"] == "fwdbwd"]
    figures = {}
    for index, name in ((0, "speed"), (1, "memory")):
        here = {r["competitor"]: r for r in sel if r["index"] == index}
        if here:
            figures[name] = {"shape": next(iter(here.values()))["shape"],
                             **{n: _figure_cell(r) for n, r in here.items() if r["status"] != "not installed"}}
    return figures


def _figure_cell(r: dict) -> dict:
    if r["status"] != "ok":
        return {"status": r["status"], "note": r.get("note")}
    return {"status": "ok", "median_ms": r["times_ms"]["median"], "peak_bytes": r["peak_bytes"],
            "speedup": r.get("speedup"), "memory_ratio": r.get("memory_ratio")}
