"""The audio codecs' residual quantizers, original against vk.patch, side by side on the installed packages.

    python bench/audio.py [--quick] [--only CASE ...] [--threads N] [--json PATH]

Cases (full sizes; --quick: tiny ones for a smoke run):
  kmeans   EnCodec's k-means init at 24 kHz, 16 x 2 s: 2400 rows x 128 dims, 1024 codes, 50 iterations
           (EuclideanCodebook.init_embed_ on its first training batch)
  encodec  an EnCodec 24 kHz training step: ResidualVectorQuantization, 32 levels, 128 dims, 1024 codes, 8 x 1 s
           at 75 Hz
  dac      a DAC 44 kHz training step: ResidualVectorQuantize, 9 levels, 1024 dims -> 8, 1024 codes, dropout 0.5,
           8 x 1 s at 86 Hz
  snac     a SNAC 24 kHz training step: ResidualVectorQuantize, 768 dims -> 8, 4096 codes, strides 4, 2, 1, 8 x 2 s
A training step: forward, backward to the input and parameters. On the CPU each case and implementation runs in
forked children (bench/_measure.py): one times a warm-up step and 3 to 7 more (median), a fresh one takes the peak
resident set of one step above the baseline after a warm-up step. The k-means case times one 50-iteration init
and takes the peak of a 2-iteration one (every iteration allocates the same; the original's N x K x D
differences dominate). On a GPU the same in one process,
peak from torch.cuda.max_memory_allocated, and the kernel launches of one step counted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import _measure  # noqa: E402

# case: (package, sizes, quick sizes)
CASES = {
    "kmeans": ("encodec", dict(rows=2400, dim=128, codes=1024, iters=50), dict(rows=256, dim=16, codes=64, iters=5)),
    "encodec": ("encodec", dict(levels=32, dim=128, codes=1024, batch=8, frames=75),
                dict(levels=3, dim=16, codes=32, batch=2, frames=12)),
    "dac": ("dac", dict(levels=9, dim=1024, codes=1024, batch=8, frames=86),
            dict(levels=3, dim=32, codes=64, batch=2, frames=12)),
    "snac": ("snac", dict(strides=[4, 2, 1], dim=768, codes=4096, batch=8, frames=96),
             dict(strides=[4, 2, 1], dim=32, codes=64, batch=2, frames=12)),
}
IMPLEMENTATIONS = ("original", "vaekernels")


def _kmeans_steps(lib, s, device):
    x = torch.randn(s["rows"], s["dim"], generator=torch.Generator().manual_seed(0)).to(device)
    cb = lib.EuclideanCodebook(s["dim"], s["codes"], kmeans_init=True, kmeans_iters=s["iters"]).to(device)

    def init(iters):
        def step():
            cb.inited.fill_(0)
            cb.kmeans_iters = iters
            torch.manual_seed(0)
            cb.init_embed_(x)
        return step
    return cb, init(s["iters"]), init(min(s["iters"], 2))


def _training_step(package, lib, s, device):
    torch.manual_seed(0)
    x = torch.randn(s["batch"], s["dim"], s["frames"]).to(device).requires_grad_()
    if package == "encodec":
        model = lib.ResidualVectorQuantization(num_quantizers=s["levels"], dim=s["dim"], codebook_size=s["codes"],
                                               kmeans_init=False)
        objective = lambda out: out[0].square().mean() + out[2].sum()  # noqa: E731
    elif package == "dac":
        model = lib.ResidualVectorQuantize(input_dim=s["dim"], n_codebooks=s["levels"], codebook_size=s["codes"],
                                           codebook_dim=8, quantizer_dropout=0.5)
        objective = lambda out: out[0].square().mean() + out[3] + out[4]  # noqa: E731
    else:
        model = lib.ResidualVectorQuantize(input_dim=s["dim"], codebook_size=s["codes"], codebook_dim=8,
                                           vq_strides=s["strides"])
        objective = lambda out: out[0].square().mean()  # noqa: E731
    model = model.to(device).train()

    def step():
        objective(model(x)).backward()
        x.grad = None
        model.zero_grad(set_to_none=True)
    return model, step


def _case(case, implementation, quick, device_name, budget_s, threads, part="both"):
    from tests import audio_peers
    import vaekernels as vk

    device = torch.device(device_name)
    torch.set_num_threads(threads)
    if part == "peak":
        _measure.peak_malloc()
    package, sizes, quick_sizes = CASES[case]
    s = quick_sizes if quick else sizes
    try:
        lib = audio_peers.load(package)
    except BaseException as e:  # noqa: BLE001 - pytest's skip when the package is absent
        return {"status": "missing", "note": str(e)}
    if case == "kmeans":
        module, step, peak_step = _kmeans_steps(lib, s, device)
    else:
        module, step = _training_step(package, lib, s, device)
        peak_step = step
    if implementation == "vaekernels":
        vk.patch(module)
    if case == "kmeans":  # a warm-up init at a tiny size (the full one takes minutes), then one full init
        small = lib.EuclideanCodebook(s["dim"], 16, kmeans_init=True, kmeans_iters=1).to(device)
        (vk.patch(small) if implementation == "vaekernels" else small).init_embed_(torch.randn(64, s["dim"], device=device))
        estimate = _measure.LONG_S + 1
    else:
        t0 = time.perf_counter()
        step()
        estimate = time.perf_counter() - t0
    if device.type == "cuda":
        samples = _measure.time_cuda(step, budget_s, 1, 5)
        peak, method = _measure.peak_cuda(peak_step)
        return {"status": "ok", "times_ms": _measure.summarize(samples), "peak_bytes": peak, "memory_method": method,
                **({} if case == "kmeans" else {"launches": _measure.count_kernels(step)["kernels"]})}
    if part == "peak":
        peak, method = _measure.peak_cpu(peak_step)
        return {"status": "ok", "peak_bytes": peak, "memory_method": method}
    _measure.timing_malloc()
    samples = _measure.time_cpu(step, estimate, budget_s, 1 if case == "kmeans" else 3, 1 if case == "kmeans" else 7)
    return {"status": "ok", "times_ms": _measure.summarize(samples)}


def _row(case, results):
    orig, ours = results["original"], results["vaekernels"]
    row = {"case": case, **results}
    if orig["status"] == ours["status"] == "ok":
        row["speedup"] = orig["times_ms"]["median"] / ours["times_ms"]["median"]
        if orig["peak_bytes"] and ours["peak_bytes"] is not None:
            row["memory_ratio"] = ours["peak_bytes"] / orig["peak_bytes"]
    return row


def _cell(r):
    if r["status"] != "ok":
        return r["note"][:80], ""
    launches = f", {r['launches']} launches" if "launches" in r else ""
    return _measure.fmt_time(r["times_ms"]["median"]) + launches, _measure.fmt_bytes(r["peak_bytes"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke run)")
    parser.add_argument("--only", nargs="+", choices=sorted(CASES), help="run only these cases")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed steps per measurement")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads (default: every core; 1 on a machine busy with other jobs, where a "
                             "parallel region stalls whenever one of its threads is descheduled)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    info = _measure.device_info(device)
    print(f"audio codecs' quantizers, original vs vk.patch, on {info['device']} (torch {info['torch']}, "
          f"{args.threads} threads)", flush=True)
    if device.type == "cpu":  # each case runs in forked children: they inherit what is imported here
        from tests import audio_peers
        _measure.preload("vaekernels")
        for case in args.only or list(CASES):
            try:
                audio_peers.load(CASES[case][0])
            except BaseException:  # noqa: BLE001 - absent (pytest's skip): the case reports it
                pass
    rows = []
    for case in args.only or list(CASES):
        results = {}
        for implementation in IMPLEMENTATIONS:
            call = (case, implementation, args.quick, args.device, args.budget, args.threads)
            if device.type == "cpu":  # timing and peak each in a fresh child
                parts = [_measure.isolated(_case, (*call, part), timeout_s=1800) for part in ("peak", "time")]
                failed = [r for r in parts if r["status"] != "ok"]
                results[implementation] = failed[0] if failed else {**parts[0], **parts[1]}
            else:
                results[implementation] = _case(*call)
            time_s, mem = _cell(results[implementation])
            print(f"  {case}: {implementation}: {time_s}, peak {mem}", flush=True)
        rows.append(_row(case, results))
    print()
    print("| case | original | vaekernels | speedup | original peak | vaekernels peak | memory ratio |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        (t0, m0), (t1, m1) = _cell(row["original"]), _cell(row["vaekernels"])
        speed = f"**{row['speedup']:.1f}×**" if "speedup" in row else "—"
        mem = f"**{100 * row['memory_ratio']:.0f}%**" if "memory_ratio" in row else "—"
        print(f"| {row['case']} | {t0} | {t1} | {speed} | {m0} | {m1} | {mem} |")
    print("\nspeedup: the original's median step time / vk.patch's; memory ratio: vk.patch's peak / the original's.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": {**info, "quick": args.quick, "threads": args.threads}, "results": rows}, f, indent=1)
    return 0 if all(r[i]["status"] == "ok" for r in rows for i in IMPLEMENTATIONS) else 1


if __name__ == "__main__":
    sys.exit(main())
