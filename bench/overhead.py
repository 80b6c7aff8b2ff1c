"""Never slower than the formula it replaces: each public op against its eager formula, host path included.

    python bench/overhead.py [--device auto|cpu|cuda] [--rounds N] [--sizes A,B] [--json PATH] [--markdown PATH] [--save]

For every public op (forward+backward; nearest_code, which has no gradient, forward) at the three sizes of
shapes.OVERHEAD (4x4 latents, 64x128, 64x4x64x64; VQ: N=4 K=8 D=8, N=256 D=64 K=512, N=8192 D=64 K=4096):
- speed: eager time / vaekernels time (>= 1 means not slower), both timed in interleaved rounds of many calls in
  one process, so that a loaded machine slows both alike (median over rounds);
- memory: vaekernels' peak / eager's peak for one step (CPU: peak RSS of a forked child; GPU: max allocated);
- host µs per call at the first size (--sizes; the smallest by default): wall time per call on the CPU; on a GPU
  the time Python spends issuing one call (no synchronisation inside the timed calls), plus the kernels one call
  launches (torch.profiler).
--save writes bench/results/<device>-<date>-overhead.{json,md} (named as bench/run.py names its runs).

--floor also measures the host-path floor of a Python autograd op, for reparameterize at each size, four ways
(ratio to the eager formula):
- eager: mu + exp(0.5 logvar) * randn (four native autograd nodes, eps saved);
- bare Function: one torch.autograd.Function issuing the reference backend's sampling calls (noise from torch's
  generator, no seed, no argument checks, no backend lookup), backward 0.5 dz (z - mu) from the saved z;
- bare Function + seed: the same plus what the sampling contract adds per call (a seed drawn from torch's
  generator, a generator re-seeded from it, the seed saved), so that compiled and eager calls draw alike;
- vaekernels: vk.reparameterize.
eager -> bare Function is the price of a Python autograd node; bare -> seed, of the seed; seed -> vaekernels, of
checks, dispatch and backend choice. Where "bare Function" is below 1.0, no op built on a Python autograd node
reaches the eager formula's speed at that size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(1, os.path.dirname(BENCH))

import torch  # noqa: E402

import _measure  # noqa: E402
from run import EAGER_FORMULAS, device_tag, make_step, vk_formulas  # noqa: E402
from shapes import OVERHEAD, Codes  # noqa: E402

from vaekernels.reference.philox import draw_seed  # noqa: E402

OPS = ("reparameterize", "gaussian_kl", "reparameterize_kl", "nearest_code", "vector_quantize")


def _steps(op: str, shape, device: torch.device) -> dict:
    """{"eager": step, "vaekernels": step} on the same fresh inputs (forward+backward, nearest_code forward)."""
    g = torch.Generator().manual_seed(0)
    mode = "fwd" if op == "nearest_code" else "fwdbwd"
    grad = mode == "fwdbwd"
    if isinstance(shape, Codes):
        z = torch.randn(shape.shape, generator=g).to(device).requires_grad_(grad)
        cb = torch.randn(shape.codes, shape.d, generator=g).to(device).requires_grad_(grad)
        args, leaves = (z, cb, shape.dim), [z, cb]
    else:
        args = leaves = _latents(shape.shape, device, grad)
    formulas = {"eager": EAGER_FORMULAS[op], "vaekernels": vk_formulas("exact")[op]}
    return {name: make_step(lambda f=f: f(*args), leaves, mode) for name, f in formulas.items()}


def _latents(shape: tuple, device: torch.device, grad: bool = True) -> list[torch.Tensor]:
    """[mu, logvar] of `shape`, the same fresh values for every comparison."""
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=g).to(device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(shape, generator=g)).to(device).requires_grad_(grad)
    return [mu, logvar]


def _per_call_s(step, device: torch.device, calls: int, synchronise: bool = True) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        step()
    if synchronise:
        _measure.sync(device)
    return (time.perf_counter() - start) / calls


def compare_speed(steps: dict, device: torch.device, rounds: int, block_s: float = 0.02) -> dict:
    """Median seconds per call of each step, timed in interleaved blocks of about `block_s`."""
    for step in steps.values():  # warm-up: lazy initialisation, Triton compilation, allocator
        step()
    _measure.sync(device)
    calls = {name: max(1, int(block_s / max(_per_call_s(step, device, 3), 1e-7))) for name, step in steps.items()}
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            samples[name].append(_per_call_s(step, device, calls[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def host_us(step, device: torch.device, calls: int = 200) -> float:
    """Microseconds of host time per call: on a GPU the issuing of `calls` calls without waiting for them."""
    step()
    _measure.sync(device)
    per_call = _per_call_s(step, device, calls, synchronise=False)
    _measure.sync(device)
    return 1e6 * per_call


def _peak(op: str, shape, device_name: str, name: str) -> dict:
    device = torch.device(device_name)
    step = _steps(op, shape, device)[name]
    step()
    _measure.sync(device)
    peak, method = (_measure.peak_cuda if device.type == "cuda" else _measure.peak_cpu)(step)
    return {"peak_bytes": peak, "method": method}


def peak_bytes(op: str, shape, device: torch.device, name: str) -> int | None:
    """Peak bytes of one step (a forked child on the CPU, for a clean high-water mark)."""
    if device.type == "cuda":
        return _peak(op, shape, "cuda", name)["peak_bytes"]
    result = _measure.isolated(_peak, (op, shape, "cpu", name), timeout_s=300)
    return result.get("peak_bytes")


def run(device: torch.device, rounds: int, sizes: list[str]) -> dict:
    smallest = sizes[0]
    cases = [(size, op, codes if op in ("nearest_code", "vector_quantize") else latent)
             for size in sizes for latent, codes in [OVERHEAD[size]] for op in OPS]
    # every memory measurement first: on the CPU they run in forked children, which must not follow this
    # process's own torch work (its thread pools do not survive a fork)
    peaks = {(size, op): {name: peak_bytes(op, shape, device, name) for name in ("eager", "vaekernels")}
             for size, op, shape in cases}
    rows = []
    for size, op, shape in cases:
        mem = peaks[size, op]
        steps = _steps(op, shape, device)
        t = compare_speed(steps, device, rounds)
        row = {"op": op, "size": size, "shape": shape.label, "eager_ms": 1e3 * t["eager"],
               "vaekernels_ms": 1e3 * t["vaekernels"], "speedup": t["eager"] / t["vaekernels"],
               "eager_peak": mem["eager"], "vaekernels_peak": mem["vaekernels"],
               "memory_ratio": mem["vaekernels"] / mem["eager"] if mem["eager"] and mem["vaekernels"] is not None
               else None}
        if size == smallest:
            row.update(eager_host_us=host_us(steps["eager"], device),
                       vaekernels_host_us=host_us(steps["vaekernels"], device))
            if device.type == "cuda":
                row.update(launches={n: _measure.count_kernels(s)["kernels"] for n, s in steps.items()})
        rows.append(row)
        print(_line(row), flush=True)
    return {"meta": _measure.device_info(device), "rows": rows}


class _Bare(torch.autograd.Function):
    """z = mu + sigma eps with eps from `generator` (torch's default when None); saves mu and z, never eps."""

    @staticmethod
    def forward(ctx, mu, logvar, seed, generator):
        eps = torch.empty_like(mu).normal_(generator=generator)
        z = torch.addcmul(mu, eps, torch.mul(logvar, 0.5).exp_(), out=eps)
        ctx.save_for_backward(mu, z, seed)
        return z

    @staticmethod
    def backward(ctx, dz):
        mu, z, _ = ctx.saved_tensors
        return dz, torch.sub(z, mu).mul_(dz).mul_(0.5), None, None


def floor_formulas(device: torch.device) -> dict:
    """{name: f(mu, logvar) -> [z]}: reparameterize the four ways of --floor."""
    reseeded = torch.Generator(device=device)

    def with_seed(mu, logvar):
        seed = draw_seed(mu.device)
        return [_Bare.apply(mu, logvar, seed, reseeded.manual_seed(int(seed)))]

    return {
        "eager": EAGER_FORMULAS["reparameterize"],
        "bare Function": lambda mu, logvar: [_Bare.apply(mu, logvar, None, None)],
        "bare Function + seed": with_seed,
        "vaekernels": vk_formulas("exact")["reparameterize"],
    }


def floor(device: torch.device, rounds: int, sizes: list[str]) -> list[dict]:
    """--floor's rows: per size, µs per forward+backward and ratio to eager of each of floor_formulas."""
    rows = []
    for size in sizes:
        leaves = _latents(OVERHEAD[size][0].shape, device)
        steps = {name: make_step(lambda f=f: f(*leaves), leaves, "fwdbwd") for name, f in floor_formulas(device).items()}
        t = compare_speed(steps, device, rounds)
        row = {"size": size, "us": {name: 1e6 * s for name, s in t.items()},
               "ratio": {name: t["eager"] / s for name, s in t.items()}}
        rows.append(row)
        print(f"floor {size:11s} " + ", ".join(f"{name} {row['ratio'][name]:.2f}x ({row['us'][name]:.0f} µs)"
                                               for name in t), flush=True)
    return rows


def _line(row: dict) -> str:
    mem = f"{row['memory_ratio']:.2f}x memory" if row.get("memory_ratio") is not None else "memory n/a"
    host = (f", host {row['vaekernels_host_us']:.0f} µs vs eager {row['eager_host_us']:.0f} µs"
            if "eager_host_us" in row else "")
    return f"{row['op']:18s} {row['size']:11s} {row['speedup']:5.2f}x eager speed, {mem}{host}"


def markdown(data: dict) -> str:
    meta = data["meta"]
    sizes = list(dict.fromkeys(r["size"] for r in data["rows"]))
    by = {(r["op"], r["size"]): r for r in data["rows"]}
    lines = [f"Per-call cost against the eager formula on {meta['device']}, {meta['date'][:10]} "
             f"(`python bench/overhead.py`; ratio = eager time / vaekernels time, forward+backward, nearest_code "
             f"forward; memory = vaekernels' peak / eager's):", "",
             "| op | " + " | ".join(sizes) + " | host µs per call at " + sizes[0] + " (vaekernels / eager) |",
             "|---|" + "---|" * (len(sizes) + 1)]
    for op in dict.fromkeys(r["op"] for r in data["rows"]):
        cells = []
        for size in sizes:
            r = by[op, size]
            mem = f", {r['memory_ratio']:.2f}× memory" if r.get("memory_ratio") is not None else ""
            cells.append(f"{r['speedup']:.2f}×{mem}")
        first = by[op, sizes[0]]
        host = f"{first['vaekernels_host_us']:.0f} / {first['eager_host_us']:.0f}"
        if "launches" in first:
            host += f" ({first['launches']['vaekernels']} / {first['launches']['eager']} launches)"
        lines.append(f"| {op} | " + " | ".join(cells) + f" | {host} |")
    if data.get("floor"):
        names = list(data["floor"][0]["ratio"])
        lines += ["", "The host-path floor (`--floor`): reparameterize forward+backward, ratio to the eager formula:", "",
                  "| size | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        lines += [f"| {r['size']} | " + " | ".join(f"{r['ratio'][n]:.2f}× ({r['us'][n]:.0f} µs)" for n in names) + " |"
                  for r in data["floor"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=15, help="interleaved timing rounds per comparison")
    parser.add_argument("--sizes", default=",".join(OVERHEAD),
                        help=f"comma-separated subset of {', '.join(OVERHEAD)}; host µs and launches at the first")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--markdown", help="write the markdown table here")
    parser.add_argument("--save", action="store_true", help="bench/results/<device>-<date>-overhead.{json,md}")
    parser.add_argument("--floor", action="store_true", help="also the host-path floor of a Python autograd op")
    args = parser.parse_args(argv)
    name = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes.split(",")
    unknown = [s for s in sizes if s not in OVERHEAD]
    if unknown:
        parser.error(f"unknown size {unknown[0]!r}; known: {', '.join(OVERHEAD)}")
    data = run(torch.device(name), args.rounds, sizes)
    if args.floor:
        data["floor"] = floor(torch.device(name), args.rounds, sizes)
    table = markdown(data)
    print("\n" + table)
    paths = {"json": args.json, "markdown": args.markdown}
    if args.save:
        stem = os.path.join(BENCH, "results", f"{device_tag(data['meta'])}-{data['meta']['date'][:10].replace('-', '')}"
                            "-overhead")
        paths = {"json": stem + ".json", "markdown": stem + ".md"}
    if paths["json"]:
        with open(paths["json"], "w") as f:
            json.dump(data, f, indent=1)
    if paths["markdown"]:
        with open(paths["markdown"], "w") as f:
            f.write(table)


if __name__ == "__main__":
    main()
