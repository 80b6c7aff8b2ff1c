"""What "auto" knows of a GPU architecture, from GPU runs: which fused backends passed parity there, and per op
and problem size the faster of them.

`python bench/run.py --dispatch` (or `--from-json RUN.json --dispatch`) writes the entries of the run's GPU
architecture into vaekernels/dispatch.json (or the file VAEKERNELS_DISPATCH_TABLE names), which
`vaekernels._backend.choose` reads. Entries come from the
rows of vaekernels[cuda] and vaekernels[triton] measured side by side: forward times for the forward ops, and
forward+backward minus forward for the backward ops. A partial run (--ops, --shapes) replaces only the entries
it measured, so a table can be built over several commands.

    python bench/dispatch.py --cuda-verified LOG

records in the same file that the CUDA backend passed the parity tests on this GPU's architecture (LOG: that
run's log; bench/gpu_check.sh first-contact runs it after its parity stage passed). "auto" takes CUDA only on
architectures with such a record (`vaekernels._backend.trusted`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from shapes import VAE_OPS

# benchmark op -> (dispatch op of its forward, dispatch op of its backward)
SOURCES = {
    **{op: ("gaussian_fwd", "gaussian_bwd") for op in VAE_OPS},
    "nearest_code": ("nearest_code", None),
    "vector_quantize": ("vq_fwd", "vq_bwd"),
}
FUSED = {"vaekernels[cuda]": "cuda", "vaekernels[triton]": "triton"}


def _size(row: dict) -> tuple[int, ...]:
    return (row["size"],) if row["op"] in VAE_OPS else (row["dims"]["N"], row["dims"]["K"], row["dims"]["D"])


def entries(rows: list[dict]) -> list[dict]:
    """[{"op", "size", "backend", "ms"}]: per dispatch op and size, the fused backend with the least time summed
    over the benchmark ops measured for every fused backend at that size."""
    ok = {(r["op"], r["mode"], r["set"], r["shape"], FUSED[r["competitor"]]): r["times_ms"]["median"]
          for r in rows if r["status"] == "ok" and r["competitor"] in FUSED}
    times: dict[tuple, dict[str, dict[str, float]]] = {}  # (dispatch op, size) -> bench case -> backend -> ms
    for r in rows:
        if r["status"] != "ok" or r["competitor"] not in FUSED or r["op"] not in SOURCES:
            continue
        fwd_op, bwd_op = SOURCES[r["op"]]
        backend, ms = FUSED[r["competitor"]], r["times_ms"]["median"]
        if r["mode"] == "fwdbwd":
            fwd_ms = ok.get((r["op"], "fwd", r["set"], r["shape"], backend))
            if bwd_op is None or fwd_ms is None:
                continue
            fwd_op, ms = bwd_op, max(ms - fwd_ms, 0.0)
        case = f"{r['op']} {r['set']} {r['shape']}"
        times.setdefault((fwd_op, _size(r)), {}).setdefault(case, {})[backend] = ms
    out = []
    for (op, size), cases in sorted(times.items()):
        both = [by for by in cases.values() if len(by) == len(FUSED)]  # compare only what both measured
        if not both:
            continue
        total = {b: sum(by[b] for by in both) for b in FUSED.values()}
        out.append({"op": op, "size": list(size), "backend": min(total, key=total.get),
                    "ms": {b: round(t, 5) for b, t in total.items()}})
    return out


def update(data: dict, path: str, source: str) -> dict:
    """Merge the run's entries into the table file at `path` under the run's architecture; returns that table."""
    meta = data["meta"]
    if meta.get("kind") != "cuda":
        raise SystemExit("--dispatch needs a GPU run: the table is per GPU architecture")
    new = entries(data["results"])
    if not new:
        raise SystemExit("--dispatch: no op was measured with both vaekernels[cuda] and vaekernels[triton]")
    doc = _load(path)
    table = doc["tables"].get(meta["capability"], {"entries": []})
    measured = {(e["op"], tuple(e["size"])) for e in new}
    kept = [e for e in table["entries"] if (e["op"], tuple(e["size"])) not in measured]
    table = {"device": meta["device"], "date": meta["date"], "torch": meta["torch"], "triton": meta["triton"],
             "source": source, "entries": sorted(kept + new, key=lambda e: (e["op"], e["size"]))}
    doc["tables"][meta["capability"]] = table
    _save(path, doc)
    return table


def record_verified(path: str, meta: dict, source: str, commit: str | None) -> dict:
    """Record in the file at `path` that the CUDA backend passed parity on the GPU that `meta` (bench/_measure's
    device_info) describes, under its architecture; `source`: the passing run's log. Returns the record."""
    doc = _load(path)
    record = {"device": meta["device"], "date": meta["date"], "torch": meta["torch"], "triton": meta["triton"],
              "cuda": meta["cuda"], "driver": meta["driver"], "source": source, "commit": commit}
    doc.setdefault("verified", {}).setdefault(meta["capability"], {})["cuda"] = record
    _save(path, doc)
    return record


def _load(path: str) -> dict:
    if not os.path.exists(path):  # a new file when VAEKERNELS_DISPATCH_TABLE names one
        return {"verified": {}, "tables": {}}
    with open(path) as f:
        return json.load(f)


def _save(path: str, doc: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def _commit() -> str | None:
    """The checkout's commit, marked when the kernels' code differs from it; None outside a git checkout."""
    def git(*args):
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__))

    head = git("rev-parse", "HEAD")
    if head.returncode:
        return None
    changed = git("status", "--porcelain", "--", ":/csrc", ":/vaekernels", ":(top,exclude)vaekernels/dispatch.json")
    return head.stdout.strip() + (" with local changes to the code" if changed.stdout.strip() else "")


def describe(table: dict) -> str:
    """One line per entry: op, size, chosen backend and the two times."""
    lines = [f"dispatch table for {table['device']} ({table['date'][:10]}):"]
    for e in table["entries"]:
        times = ", ".join(f"{b} {ms:.4f} ms" for b, ms in e["ms"].items())
        lines.append(f"  {e['op']:13s} {'x'.join(map(str, e['size'])):>22s} -> {e['backend']:6s} ({times})")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda-verified", metavar="LOG", required=True,
                        help="record that the CUDA backend passed the parity tests on this GPU (LOG: that run's log)")
    args = parser.parse_args(argv)
    sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the working tree's vaekernels
    import torch

    import _measure
    from vaekernels import _backend

    ok, why = _backend.availability("cuda")
    if not ok:
        raise SystemExit(f"--cuda-verified needs the cuda backend running on a GPU: {why}")
    meta = _measure.device_info(torch.device("cuda"))
    record = record_verified(_backend.DISPATCH_TABLE, meta, args.cuda_verified, _commit())
    print(f"recorded in {_backend.DISPATCH_TABLE}: cuda verified on {meta['capability']} ({record['device']}, "
          f"{record['date'][:10]}, {record['source']})")


if __name__ == "__main__":
    main()
