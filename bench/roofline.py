"""Where the search's time should go on a GPU, before one measures it: per case and kernel, the grid and its waves
over the SMs, FLOPs and bytes, the compute and memory bounds and the time at the bound.

    python bench/roofline.py [--device h200] [--json OUT.json]

The model counts what the kernels must do, not what they happen to do: the search's 2 N K D multiply-add FLOPs on
the unit its precision uses (float32 CUDA cores for "exact", TF32 or BF16 tensor cores), and HBM bytes for reading
z and the codebook once (later row blocks find the codebook in L2 when it fits) plus its candidate lists; the finish
kernel reads z, the candidates and the chosen codes and writes indices and quantized rows (the re-search runs only
on flagged rows and is left out). A measured time within
2x of the prediction is healthy; far above it, the kernel is latency- or occupancy-bound (see the waves column).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Dense (no sparsity) peaks and HBM bandwidth from NVIDIA's datasheets: H100 SXM5 and H200 SXM (Hopper: FP32 67
# TFLOPS, TF32 495, BF16 989; HBM3 3.35 TB/s, HBM3e 4.8 TB/s), A100 SXM4 80 GB (FP32 19.5, TF32 156, BF16 312;
# HBM2e 2.039 TB/s). L2: 50 MB (H100/H200), 40 MB (A100).
DEVICES = {
    "h100": {"name": "NVIDIA H100 SXM5", "sms": 132, "fp32": 67e12, "tf32": 495e12, "bf16": 989e12,
             "hbm": 3.35e12, "l2": 50e6},
    "h200": {"name": "NVIDIA H200 SXM", "sms": 132, "fp32": 67e12, "tf32": 495e12, "bf16": 989e12,
             "hbm": 4.8e12, "l2": 50e6},
    "a100": {"name": "NVIDIA A100 SXM4 80GB", "sms": 108, "fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12,
             "hbm": 2.039e12, "l2": 40e6},
}
# the nearest_code cases the GPU benchmark runs (bench/shapes.py's gpu sizes): rows N, codes K, dims D
CASES = [("vqgan", 4096, 16384, 256), ("llamagen", 2048, 16384, 8), ("rvq level", 750, 1024, 128),
         ("large", 16384, 16384, 256)]
UNIT = {"exact": "fp32", "tf32": "tf32", "bf16": "bf16"}


@dataclass
class Prediction:
    device: str
    case: str
    precision: str
    kernel: str
    grid: int
    waves: float
    flops: float
    bytes: float
    compute_us: float
    memory_us: float
    bound_us: float


def predict(device: str, case: str, n: int, k: int, d: int, precision: str) -> list[Prediction]:
    """The search's kernels for one nearest_code call (split count as the kernel chooses it on this device)."""
    from vaekernels.triton import vq

    dev = DEVICES[device]
    row_blocks = math.ceil(n / vq._SPLIT_BLOCK_N)
    splits = vq.split_count(n, k, dev["sms"])
    cand = splits * n * (vq.CANDIDATES * 8 + 16)  # candidate indices and bounds, count, U and the least d~ - B
    codebook = 4 * k * d * (1 if 4 * k * d <= dev["l2"] / 2 else row_blocks)
    finish_rows = math.ceil(n / vq._FINISH_ROWS)
    kernels = [
        ("code stats", math.ceil(k / 64), 3 * k * d, 4 * k * d + 16 * k, "fp32"),
        ("search", row_blocks * splits, 2 * n * k * d, 4 * n * d + codebook + cand, UNIT[precision]),
        ("finish", finish_rows, 2 * n * d, 8 * n * d + cand + 8 * n, "fp32"),
    ]
    out = []
    for name, grid, flops, nbytes, unit in kernels:
        compute, memory = flops / dev[unit] * 1e6, nbytes / dev["hbm"] * 1e6
        out.append(Prediction(device, case, precision, name, grid, grid / dev["sms"], flops, nbytes, compute, memory,
                              max(compute, memory)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=sorted(DEVICES), nargs="+", default=sorted(DEVICES))
    parser.add_argument("--json", help="write the predictions here")
    args = parser.parse_args(argv)
    rows = [p for dev in args.device for case, n, k, d in CASES for precision in UNIT
            for p in predict(dev, case, n, k, d, precision)]
    print("| device | case | precision | kernel | grid | waves | GFLOP | MB | compute µs | memory µs | bound µs |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for p in rows:
        print(f"| {p.device} | {p.case} | {p.precision} | {p.kernel} | {p.grid} | {p.waves:.2f} | {p.flops / 1e9:.3f} "
              f"| {p.bytes / 1e6:.2f} | {p.compute_us:.1f} | {p.memory_us:.1f} | {p.bound_us:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(p) for p in rows], f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
