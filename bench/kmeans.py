"""k-means for codebook initialisation: vk.kmeans (Lloyd's algorithm on the fused search) against
vector-quantize-pytorch's `kmeans` (Lloyd over a full N x K cdist), on the same data from the same seed.

    python bench/kmeans.py [--quick] [--iters N] [--only NAME ...] [--backend NAME] [--json PATH]

Sizes: LlamaGen's tokenizer (65536 rows x 8 dims, 16384 codes) and a wide codebook (16384 x 256, 8192 codes),
10 iterations by default; --quick: tiny sizes for a smoke run. Both start from the same initial sample (the same
torch.manual_seed before each), so the codebooks agree except where float rounding breaks a near-tie.

CPU: every measurement runs in a forked child (bench/_measure.py): the time of one `iters`-iteration run, then,
in a fresh child, the peak resident set above the baseline of a run of min(iters, 2) iterations (from the second
iteration on each allocates the same: vector-quantize-pytorch still holds the previous distance matrix while it
computes the next, so one iteration would understate its peak by a quarter). The child's address space is
capped below the machine's free memory, so a run that does not fit fails cleanly (reported) instead of calling
the OOM killer. GPU: the same in one process, with torch.cuda.synchronize around the timed run and
torch.cuda.max_memory_allocated for the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _measure  # noqa: E402

SIZES = {  # name: (rows, dims, codes)
    "llamagen": (65536, 8, 16384),
    "wide": (16384, 256, 8192),
}
QUICK_SIZES = {
    "llamagen": (2048, 8, 512),
    "wide": (1024, 64, 256),
}
COMPETITORS = ("vaekernels", "vector-quantize-pytorch")
SEED = 0


def _kmeans_fn(competitor: str):
    if competitor == "vaekernels":
        import vaekernels as vk

        return lambda x, k, iters: vk.kmeans(x, k, iters=iters)
    from vector_quantize_pytorch.vector_quantize_pytorch import kmeans

    return lambda x, k, iters: kmeans(x[None], k, iters)[0][0]


def _data(size, device):
    n, d, _ = size
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1234)).to(device)


def _run(competitor, size, iters, device):
    """One seeded run: (codebook, seconds)."""
    fn, x = _kmeans_fn(competitor), _data(size, device)
    fn(x[:256], 16, 1)  # lazy initialisation (imports, thread pools, kernels) outside the measurement
    _measure.sync(device)
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    codebook = fn(x, size[2], iters)
    _measure.sync(device)
    return codebook, time.perf_counter() - t0


def time_case(competitor, size, iters, device_name, backend):
    device = torch.device(device_name)
    _backend(backend)
    if device.type == "cpu":
        _measure.timing_malloc()
    codebook, seconds = _run(competitor, size, iters, device)
    # numpy pickles by value; a tensor would go through shared memory that dies with the child
    return {"status": "ok", "seconds": seconds, "codebook": codebook.float().cpu().numpy()}


def peak_case(competitor, size, iters, device_name, backend):
    device = torch.device(device_name)
    _backend(backend)
    fn, x = _kmeans_fn(competitor), _data(size, device)
    fn(x[:256], 16, 1)

    def step():
        torch.manual_seed(SEED)
        fn(x, size[2], min(iters, 2))

    peak, method = _measure.peak_cuda(step) if device.type == "cuda" else _measure.peak_cpu(step)
    return {"status": "ok", "peak_bytes": peak, "memory_method": method}


def _backend(name):
    import vaekernels as vk

    vk.set_backend(name)


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))


def measure(competitor, size, iters, device, backend, timeout_s):
    if device.type == "cuda":
        try:
            result = time_case(competitor, size, iters, "cuda", backend)
            result.update(peak_case(competitor, size, iters, "cuda", backend))
        except torch.cuda.OutOfMemoryError as e:
            torch.cuda.empty_cache()
            return {"status": "error", "note": f"out of memory: {str(e).splitlines()[0]}"}
        return result
    limit = int(0.9 * _available_bytes())
    timed = _measure.isolated(time_case, (competitor, size, iters, "cpu", backend), timeout_s, limit)
    if timed.get("status") != "ok":
        return timed
    peak = _measure.isolated(peak_case, (competitor, size, iters, "cpu", backend), timeout_s, limit)
    if peak.get("status") != "ok":
        return peak
    return {**timed, **peak}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--iters", type=int, default=10, help="Lloyd iterations (default 10)")
    parser.add_argument("--only", nargs="+", choices=sorted(SIZES), help="run only these sizes")
    parser.add_argument("--backend", default="auto", help="vaekernels backend (default auto)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.iters < 1:
        parser.error("--iters must be >= 1")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # each case runs in forked children: they inherit what is imported here
        _measure.preload("vaekernels", "vector_quantize_pytorch")
    sizes = QUICK_SIZES if args.quick else SIZES
    names = args.only or list(sizes)
    info = _measure.device_info(device)
    print(f"k-means, {args.iters} iterations, on {info['device']} (torch {info['torch']}, "
          f"vaekernels backend {args.backend})", flush=True)
    rows = []
    for name in names:
        size = sizes[name]
        results = {}
        for competitor in COMPETITORS:
            t0 = time.perf_counter()
            results[competitor] = measure(competitor, size, args.iters, device, args.backend, args.timeout)
            r = results[competitor]
            status = (f"{r['seconds']:.2f} s, peak {_measure.fmt_bytes(r['peak_bytes'])}" if r["status"] == "ok"
                      else r["note"])
            print(f"  {name} {size}: {competitor}: {status} ({time.perf_counter() - t0:.0f} s wall)", flush=True)
        vk_r, vqp_r = results["vaekernels"], results["vector-quantize-pytorch"]
        row = {"size": name, "rows": size[0], "dims": size[1], "codes": size[2], "iters": args.iters,
               **{f"{c}": {k: v for k, v in r.items() if k != "codebook"} for c, r in results.items()}}
        if vk_r["status"] == "ok" and vqp_r["status"] == "ok":
            row["speedup"] = vqp_r["seconds"] / vk_r["seconds"]
            row["memory_ratio"] = (vk_r["peak_bytes"] / vqp_r["peak_bytes"]
                                   if vk_r["peak_bytes"] is not None and vqp_r["peak_bytes"] else None)
            delta = torch.from_numpy(vk_r["codebook"] - vqp_r["codebook"]).abs().amax(dim=1)
            row["codes_agreeing"] = float((delta <= 1e-4).float().mean())
        rows.append(row)

    print()
    print("| size | iters | vaekernels | vector-quantize-pytorch | speedup | vaekernels peak | "
          "vector-quantize-pytorch peak | memory ratio | codes agreeing |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        vk_r, vqp_r = row["vaekernels"], row["vector-quantize-pytorch"]

        def cell(r, key):
            if r["status"] != "ok":
                return r["note"]
            return f"{r['seconds']:.2f} s" if key == "seconds" else _measure.fmt_bytes(r["peak_bytes"])

        speed = f"**{row['speedup']:.1f}×**" if "speedup" in row else "—"
        mem = f"**{100 * row['memory_ratio']:.1f}%**" if row.get("memory_ratio") is not None else "—"
        agree = f"{100 * row['codes_agreeing']:.1f}%" if "codes_agreeing" in row else "—"
        print(f"| {row['size']}, N={row['rows']} D={row['dims']} K={row['codes']} | {row['iters']} | "
              f"{cell(vk_r, 'seconds')} | {cell(vqp_r, 'seconds')} | {speed} | {cell(vk_r, 'peak')} | "
              f"{cell(vqp_r, 'peak')} | {mem} | {agree} |")
    print("\nspeedup: vector-quantize-pytorch's time / vaekernels'; memory ratio: vaekernels' peak / "
          "vector-quantize-pytorch's (peak above the baseline, min(iters, 2) iterations); codes agreeing: "
          "centres equal within 1e-4 (the rest follow a float near-tie broken the other way).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {**info, "iters": args.iters, "quick": args.quick, "backend": args.backend},
                       "results": rows}, f, indent=1)
    return 0 if all(r[c]["status"] == "ok" for r in rows for c in COMPETITORS) else 1


if __name__ == "__main__":
    sys.exit(main())
