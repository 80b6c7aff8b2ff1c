"""The benchmark command: every vaekernels op, forward and forward+backward, on named realistic shapes, against the
eager PyTorch formula, torch.compile of it, each vaekernels backend and the libraries people use instead.

    python bench/run.py [--quick] [--device auto|cpu|cuda] [--ops a,b] [--shapes a,b] [--competitors a,b]
                        [--json PATH] [--markdown [PATH]] [--plot PATH] [--save] [--from-json PATH] [--cpu-compile]
                        [--dispatch] [--docs] [--first-contact]

Defaults to the GPU when there is one (the shapes the models train with), else the CPU with CPU-sized shapes
(the two headline figures keep their full size; torch.compile only with --cpu-compile, as compiling would take
longer than the rest). --quick: tiny shapes of one set per code path, every comparison once (CI smoke test).
Prints a table of speedups against the eager formula and writes JSON (default bench/out/results-<device>.json);
--markdown writes (or prints) the self-contained report of the run (all tables); --save
writes JSON, markdown and plot under bench/results/ (see bench/results/README.md); --from-json renders a saved run;
--dispatch writes the GPU's per-op, per-size backend choice for "auto" into vaekernels/dispatch.json (dispatch.py);
--docs (or --readme) regenerates docs/performance.md's block for the run's device kind (headline table, link to
the full one);
--first-contact measures only the first GPU contact's numbers (one shape per op, shapes.FIRST_CONTACT).

Each comparison fails soft: a failing alternative becomes an error string in its row. On the CPU every
comparison runs in a forked child (fresh peak-RSS measurement, an address-space cap, a time limit); the parent
never runs torch work itself, so forking stays safe.

The parts: shapes.py (the named shape sets) and cases.py (cases, their inputs, the comparisons of a run) say
what is measured; competitors.py who is measured; comparison.py runs one comparison and annotates the rows
(_measure.py times it); report.py prints and writes the reports; this file is the command.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for path in (BENCH, ROOT):  # the working tree's vaekernels, even when it is not installed
    if path not in sys.path:
        sys.path.insert(0 if path == BENCH else 1, path)

import torch  # noqa: E402

import _measure  # noqa: E402
import dispatch  # noqa: E402
import vaekernels as vk  # noqa: E402
from cases import Case, Plan, Skip, cases, comparisons  # noqa: E402,F401 - re-exported: run.Plan, run.cases, ...
from comparison import (  # noqa: E402,F401
    annotate, build_step, copy_bandwidth, execute, headline_figures, launch_counts, make_step, row, run_comparison)
from competitors import BY_NAME, COMPETITORS, EAGER_FORMULAS, Competitor, vk_formulas  # noqa: E402,F401
from report import console_report, headline, markdown_report, plot, update_block, write  # noqa: E402,F401
from shapes import FIRST_CONTACT, OPS, QUICK_SETS, shape_sets  # noqa: E402
from vaekernels import _backend  # noqa: E402

PERFORMANCE_PAGE = os.path.join(ROOT, "docs", "performance.md")  # where --docs writes the run's headline block

# ------------------------------------------------------------------ the command


def device_tag(meta: dict) -> str:
    """The device in file names, as bench/gpu_check.sh writes it (spaces as underscores), or "cpu"."""
    return meta["device"].replace(" ", "_") if meta["kind"] == "cuda" else "cpu"


def _names(value: str | None, known, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if not any(k == n or k.startswith(n) for k in known)]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _preload(competitors) -> None:
    """Import what the children will need once, in the parent (imports only: no torch work before forking)."""
    import torch._dynamo  # noqa: F401

    modules = {"diffusers": "diffusers.models.autoencoders.vae", "vector_quantize_pytorch": "vector_quantize_pytorch"}
    for c in competitors:
        if c.package in modules and importlib.util.find_spec(c.package):
            importlib.import_module(modules[c.package])


def benchmark(plan: Plan, ops, set_names, competitor_names, progress: bool = True,
              first_contact: bool = False) -> dict:
    """Run the selected comparisons (with `first_contact`, only those at the shapes of shapes.FIRST_CONTACT); the
    whole result as a JSON-ready dict."""
    from tqdm import tqdm

    sets = shape_sets(plan.size)
    set_names = set_names or (QUICK_SETS if plan.size == "quick" else None)
    if set_names:
        sets = {n: s for n, s in sets.items() if n in set_names}
    competitors = tuple(c for c in COMPETITORS if not competitor_names or c.name == "eager"  # the baseline, always
                        or any(c.name == n or c.name.startswith(n) for n in competitor_names))
    selected = cases(sets, tuple(ops or OPS))
    if first_contact:
        selected = [c for c in selected if (c.op, c.set.name, c.shape.label) in FIRST_CONTACT]
        if not selected:
            raise SystemExit("--first-contact: no shape of shapes.FIRST_CONTACT is among this device's (they are "
                             "GPU-size): run it on a GPU")
        sets = {n: s for n, s in sets.items() if any(c.set.name == n for c in selected)}
    jobs = comparisons(selected, competitors)
    if plan.device.type == "cpu":
        _preload(competitors)
    meta = _measure.device_info(plan.device)
    copy = execute(copy_bandwidth, (plan.device,), plan)
    peaks = _measure.peak_tflops(meta["device"]) if plan.device.type == "cuda" else None
    meta.update(shape_size=plan.size, shape_sets={n: s.description for n, s in sets.items()},
                torch_threads=copy.get("threads"),
                copy_bandwidth_gbps=copy["bytes_per_s"] / 1e9 if copy["status"] == "ok" else None,
                peak_tflops=peaks, vaekernels=vk.__version__,
                memory_method=("torch.cuda.max_memory_allocated above baseline" if plan.device.type == "cuda"
                               else "peak RSS above baseline, one forked child per comparison"),
                timer=("CUDA events, L2 flushed before each step" if plan.device.type == "cuda"
                       else "wall clock, repeated steps"),
                competitors={c.name: (dict(zip(("status", "note"), c.unavailable(plan.device)))
                                      if c.unavailable(plan.device) else {"status": "available"})
                             for c in competitors})
    rows = []
    bar = tqdm(jobs, desc="bench", unit="cmp", dynamic_ncols=True, disable=not progress)
    for case, competitor in bar:
        bar.set_postfix_str(f"{case.describe()} · {competitor.name}")
        missing = competitor.unavailable(plan.device)
        if missing:
            result = {"status": missing[0], "note": missing[1]}
        else:
            result = execute(run_comparison, (case, competitor, plan), plan)
        rows.append(row(case, competitor, result))
    bar.close()
    annotate(rows, copy.get("bytes_per_s"), peaks)
    return {"meta": meta, "results": rows, "figures": headline_figures(rows),
            "launches": launch_counts(plan, competitors)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, every comparison once (CI, < 2 minutes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--ops", help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--shapes", help=f"comma list of shape sets: {', '.join(shape_sets('gpu'))}")
    parser.add_argument("--competitors", help="comma list of competitor names or prefixes, e.g. "
                        "vaekernels,torch.compile (eager always runs)")
    parser.add_argument("--json", metavar="PATH", help="results JSON (default bench/out/results-<device>.json)")
    parser.add_argument("--markdown", metavar="PATH", nargs="?", const="-", help="markdown table block (- or no "
                        "PATH: print it)")
    parser.add_argument("--plot", metavar="PATH", help="PNG of speedup vs size")
    parser.add_argument("--save", action="store_true", help="write JSON, markdown and PNG to bench/results/")
    parser.add_argument("--from-json", metavar="PATH", help="render a saved run instead of running")
    parser.add_argument("--cpu-compile", action="store_true", help="run torch.compile on the CPU too (slow: "
                        "compiles a graph per op, mode and set)")
    parser.add_argument("--docs", "--readme", dest="docs", action="store_true", help="regenerate "
                        "docs/performance.md's block for this run's kind (CPU or GPU) from it; with --save or "
                        "--from-json, whose markdown it links")
    parser.add_argument("--first-contact", action="store_true", help="only the first GPU contact's shapes, one per "
                        "op (shapes.FIRST_CONTACT; bench/gpu_check.sh first-contact)")
    parser.add_argument("--dispatch", action="store_true", help="write this GPU run's fastest fused backend per "
                        "op and size into vaekernels/dispatch.json (the table \"auto\" uses)")
    parser.add_argument("--timeout", type=float, help="seconds per comparison on the CPU (default 900, quick 120)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
        plan = Plan.make(torch.device("cuda" if cuda else "cpu"), args.quick, args.timeout, args.cpu_compile)
        ops = _names(args.ops, OPS, "ops")
        set_names = _names(args.shapes, list(shape_sets("gpu")), "shape sets")
        competitor_names = _names(args.competitors, list(BY_NAME), "competitors")
        data = benchmark(plan, ops, set_names, competitor_names, progress=not args.no_progress,
                         first_contact=args.first_contact)
    tag = device_tag(data["meta"])
    print(console_report(data))
    outputs = {}
    if not args.from_json:
        outputs["json"] = args.json or os.path.join(BENCH, "out", f"results-{tag}.json")
    if args.save:
        stem = os.path.join(BENCH, "results", f"{tag}-{data['meta']['date'][:10].replace('-', '')}")
        outputs.update(json=f"{stem}.json", markdown=f"{stem}.md", plot=f"{stem}.png")
    outputs.update({k: v for k, v in (("markdown", args.markdown), ("plot", args.plot)) if v})
    if "json" in outputs:
        write(outputs["json"], json.dumps(data, indent=1, default=str) + "\n")
    if outputs.get("markdown") == "-":
        print("\n" + markdown_report(data))
    elif "markdown" in outputs:
        write(outputs["markdown"], markdown_report(data))
    if "plot" in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(outputs["plot"])), exist_ok=True)
        plot(data, outputs["plot"])
    if args.docs:
        tables = outputs.get("markdown") if args.save else args.from_json and args.from_json[:-5] + ".md"
        if not tables:
            raise SystemExit("--docs needs --save or --from-json (the block links the full tables)")
        update_block(PERFORMANCE_PAGE, data["meta"]["kind"], headline(data, os.path.relpath(tables, ROOT)))
        outputs["docs"] = PERFORMANCE_PAGE
    if args.dispatch:
        source = os.path.relpath(args.from_json or outputs["json"], ROOT)
        print("\n" + dispatch.describe(dispatch.update(data, _backend.DISPATCH_TABLE, source)))
        outputs["dispatch"] = _backend.DISPATCH_TABLE
    written = [v for v in outputs.values() if v != "-"]
    if written:
        print(f"\nwrote {', '.join(written)}")


if __name__ == "__main__":
    main()
