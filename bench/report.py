"""How the benchmark reports: the console table, the self-contained markdown report (bench/results/<run>.md),
the generated block of docs/performance.md (the headline table of a run: --docs), and the plot of speedup
against problem size."""
from __future__ import annotations

import os
from typing import Callable

from _measure import fmt_bytes, fmt_time
from comparison import HEADLINE_TARGETS, headline_figures
from competitors import COMPETITORS
from shapes import OPS, VAE_OPS


def _util(r: dict) -> str:
    if r.get("bandwidth_pct") is not None:
        return f"{r['bandwidth_pct']:.0f}% bw"
    if r.get("peak_pct") is not None:
        return f"{r['peak_pct']:.1f}% peak"
    return ""


def _cell_md(r: dict) -> str:
    t = r["times_ms"]
    spread = f" ±{50 * (t['q75'] - t['q25']) / t['median']:.0f}%" if t["n"] > 1 else ""
    parts = [fmt_time(t["median"]) + spread, fmt_bytes(r["peak_bytes"]), _util(r)]
    if r["competitor"] != "eager" and r.get("speedup") is not None:
        parts.insert(0, f"**{r['speedup']:.2f}×**")
    return " · ".join(p for p in parts if p)


def _cell_console(r: dict) -> str:
    if r["competitor"] == "eager" or r.get("speedup") is None:
        return fmt_time(r["times_ms"]["median"])
    return f"{r['speedup']:.2f}x"


def pivot(rows: list[dict], op: str, cell: Callable[[dict], str], short_notes: bool):
    """(header, body, footnotes, absent) of one op's table: a line per (set, shape, mode), a column per
    competitor that ran at least once; skips and errors become numbered footnotes, and the competitors that never
    ran go to `absent` {name: reasons}, which the reports list once for all ops."""
    mine = [r for r in rows if r["op"] == op]
    names = [c.name for c in COMPETITORS if any(r["competitor"] == c.name for r in mine)]
    ran = [n for n in names if any(r["competitor"] == n and r["status"] == "ok" for r in mine)]
    absent = {n: {f"{r['status']}: {r.get('note')}" for r in mine if r["competitor"] == n}
              for n in names if n not in ran}
    footnotes, lines, body = {}, {}, []
    for r in mine:
        lines.setdefault((r["set"], r["shape"], r["mode"]), {})[r["competitor"]] = r
    for (set_name, shape, mode), by in lines.items():
        cells = []
        for n in ran:
            r = by.get(n)
            if r is None:
                cells.append("")
            elif r["status"] == "ok":
                cells.append(cell(r))
            else:
                number = footnotes.setdefault(f"{r['status']}: {r.get('note')}", len(footnotes) + 1)
                status = ("err" if r["status"] == "error" else "skip") if short_notes else r["status"]
                cells.append(f"{status} [{number}]")
        body.append([set_name, shape, mode, *cells])
    return ["set", "shape", "mode", *ran], body, [f"[{i}] {text}" for text, i in footnotes.items()], absent


def _absent_lines(rows: list[dict]) -> list[str]:
    """'name: reason' for every competitor that did not run for some op, once for the whole report."""
    absent: dict[str, set] = {}
    for op in OPS:
        for name, reasons in pivot(rows, op, str, True)[3].items():
            absent.setdefault(name, set()).update(reasons)
    return [f"{name}: {'; '.join(sorted(reasons))}" for name, reasons in absent.items()]


def _op_title(op: str) -> str:
    return "VectorQuantizer module (EMA, training mode)" if op == "vq_module" else op


def console_report(data: dict) -> str:
    meta, rows = data["meta"], data["results"]
    out = [f"{meta['device']} | torch {meta['torch']} | {meta['date']} | speedup vs eager (x), "
           "eager column: median time"]
    for op in OPS:
        if not any(r["op"] == op for r in rows):
            continue
        header, body, notes, _ = pivot(rows, op, _cell_console, short_notes=True)
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)]
        out.append(f"\n{_op_title(op)}")
        out += ["  ".join(str(x).ljust(w) for x, w in zip(line, widths)) for line in [header, *body]]
        out += [f"  {n}" for n in notes]
    absent = _absent_lines(rows)
    out += ["", "not measured:", *(f"  {line}" for line in absent)] if absent else []
    out += ["", *_summary_lines(data, False)]
    return "\n".join(out)


def _figure_text(cell: dict) -> str:
    if cell["status"] != "ok":
        return f"{cell['status']}: {cell.get('note')}"
    return f"{fmt_time(cell['median_ms'])}, peak {fmt_bytes(cell['peak_bytes'])}"


def _summary_lines(data: dict, markdown: bool) -> list[str]:
    """The two headline figures and the kernel launch counts in words."""
    lines, bullet = [], "- " if markdown else ""
    for name, fig in headline_figures(data["results"]).items():
        eager_cell = fig.get("eager", {"status": "absent", "note": "not run"})
        for competitor, cell in fig.items():
            if not competitor.startswith("vaekernels") or cell["status"] == "skipped":
                continue
            ratios = [f"speed ratio {cell['speedup']:.2f}×" if cell.get("speedup") else "",
                      f"memory ratio {100 * cell['memory_ratio']:.1f}%" if cell.get("memory_ratio") else ""]
            lines.append(f"{bullet}vector_quantize fwd+bwd {fig['shape']} ({HEADLINE_TARGETS[name]}): "
                         f"{competitor} {_figure_text(cell)}; eager {_figure_text(eager_cell)}"
                         + "".join(f"; {r}" for r in ratios if r))
    launches = data.get("launches", {})
    if "counts" in launches:
        parts = [f"{n} {v['kernels']} ({v['non_aten']} non-ATen)" if v["status"] == "ok"
                 else f"{n} {v['status']}: {v['note']}" for n, v in launches["counts"].items()]
        lines.append(f"{bullet}Kernel launches, {launches['case']}: " + ", ".join(parts)
                     + " (target: ≤ 2 of ours; eager about a dozen)")
    else:
        lines.append(f"{bullet}Kernel launches: {launches.get('note', 'n/a')}")
    return lines


def _versions(meta: dict) -> str:
    """What the numbers ran on: torch and triton, and on a GPU the CUDA and driver versions."""
    versions = f"torch {meta['torch']}, triton {meta['triton']}"
    if meta["kind"] == "cuda":
        versions += f", CUDA {meta['cuda']}, driver {meta['driver']}"
    return versions


def markdown_report(data: dict) -> str:
    """A self-contained markdown block: header naming the device and date, versions, one table per op."""
    meta, rows = data["meta"], data["results"]
    versions = _versions(meta)
    if meta["kind"] != "cuda":
        versions += f", load average {meta['load_average'][0]:.1f} at start"
    bw, peaks = meta.get("copy_bandwidth_gbps"), meta.get("peak_tflops")
    bw_text = f"{bw:.0f} GB/s" if bw else "n/a"
    peak_text = f"{peaks['matched']}: {peaks['fp32']} TFLOP/s fp32, {peaks['tf32']} tf32" if peaks else "n/a"
    out = [f"### vaekernels benchmark: {meta['device']}, {meta['date'][:10]}", "",
           f"{versions}; `{meta['command']}`; {meta['shape_size']} shapes. Cells: speedup against the eager "
           f"formula · median time ±half the interquartile range · peak memory ({meta['memory_method']}) · for "
           f"the elementwise ops effective bandwidth as % of the measured copy bandwidth ({bw_text}), for the "
           f"searches 2·N·K·D FLOP/s as % of the device's dense peak ({peak_text})"
           ". fwd: forward under no_grad; fwdbwd: forward and backward. Shape sets: "
           + "; ".join(f"{name}: {text}" for name, text in meta.get("shape_sets", {}).items()) + "."]
    for op in OPS:
        if not any(r["op"] == op for r in rows):
            continue
        header, body, notes, _ = pivot(rows, op, _cell_md, short_notes=False)
        out += ["", f"#### {_op_title(op)}", "", "| " + " | ".join(header) + " |",
                "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(x) for x in line) + " |" for line in body]
        if notes:
            out += [""] + [f"{n}  " for n in notes]
    absent = _absent_lines(rows)
    out += ["", "Not measured here:", "", *(f"- {line}" for line in absent)] if absent else []
    out += ["", "#### Figures", "", *_summary_lines(data, markdown=True)]
    return "\n".join(out) + "\n"


HEADLINE_COLUMNS = ("torch.compile", "vector-quantize-pytorch", "diffusers", "faiss", "pykeops")


def headline(data: dict, tables: str) -> str:
    """docs/performance.md's block for one run: per op, set and mode at the set's largest shape, the eager time, the best
    vaekernels backend (speedup and memory against eager) and the other competitors' speedups; `tables` names
    the full report."""
    meta, rows = data["meta"], [r for r in data["results"] if r["status"] == "ok"]
    last = {}
    for r in rows:
        key = (r["op"], r["set"])
        last[key] = max(last.get(key, 0), r["index"])
    columns = [c for c in HEADLINE_COLUMNS if any(r["competitor"] == c for r in rows)]
    out = [f"Measured on {meta['device']}, {meta['date'][:10]} ({_versions(meta)}; `{meta['command']}`), the largest "
           f"shape of each set; speedup and peak memory against the eager formula. Full tables: `{tables}`.", "",
           "| op | set, shape | mode | eager | vaekernels | " + " | ".join(columns) + " |",
           "|" + "---|" * (5 + len(columns))]
    for op in OPS:
        here = [r for r in rows if r["op"] == op and r["index"] == last[op, r["set"]]]
        for set_name, shape, mode in dict.fromkeys((r["set"], r["shape"], r["mode"]) for r in here):
            by = {r["competitor"]: r for r in here if (r["set"], r["shape"], r["mode"]) == (set_name, shape, mode)}
            if "eager" not in by:
                continue
            ours = [r for n, r in by.items() if n.startswith("vaekernels") and r.get("speedup")]
            best = max(ours, key=lambda r: r["speedup"]) if ours else None
            ours_cell = "—"
            if best:
                memory = f" · {100 * best['memory_ratio']:.0f}% mem" if best.get("memory_ratio") else ""
                ours_cell = f"**{best['speedup']:.2f}×** ({best['competitor'][11:-1]}){memory}"
            others = [f"{by[c]['speedup']:.2f}×" if c in by and by[c].get("speedup") else "—" for c in columns]
            eager_ms = fmt_time(by["eager"]["times_ms"]["median"])
            out.append(f"| {_op_title(op)} | {set_name}, {shape} | {mode} | {eager_ms} | {ours_cell} | "
                       + " | ".join(others) + " |")
    return "\n".join(out + ["", *_summary_lines(data, markdown=True)]) + "\n"


def update_block(path: str, kind: str, block: str) -> None:
    """Replace the page's generated block for `kind` ("cpu" or "cuda"), between its two marker comments."""
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write(path, f"{head}{start}\n{block}{end}{tail}")


def plot(data: dict, path: str) -> None:
    """PNG of speedup against eager vs problem size, one panel per op, a line per competitor and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    ops = [op for op in OPS if any(r["op"] == op for r in data["results"])]
    fig, axes = plt.subplots(2, 3, figsize=(16, 9), squeeze=False)
    for ax, op in zip(axes.flat, ops):
        for name in (c.name for c in COMPETITORS if c.name != "eager"):
            for mode, style in (("fwd", "-"), ("fwdbwd", "--")):
                pts = sorted((r["size"], r["speedup"]) for r in data["results"]
                             if r["op"] == op and r["mode"] == mode and r["competitor"] == name
                             and r["status"] == "ok" and r.get("speedup"))
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", label=f"{name} {mode}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set(xscale="log", yscale="log", title=_op_title(op),
               xlabel="elements" if op in VAE_OPS else "search FLOPs (2·N·K·D)", ylabel="speedup vs eager")
        ax.xaxis.set_minor_formatter(NullFormatter())
        if ax.lines[1:]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops):]:
        ax.axis("off")
    meta = data["meta"]
    fig.suptitle(f"vaekernels: {meta['device']}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def write(path: str, text: str) -> None:
    """Write `text` to `path`, making its folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
