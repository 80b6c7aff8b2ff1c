"""IBQ with the entropy loss, forward + backward: vk.index_backprop_quantize against the dense formula
(SEED-Voken's IndexPropagationQuantize with MAGVIT-v2's entropy loss, tests/doubles/seed_voken.py).

    python bench/ibq.py            CPU: N = 4096 rows x 2^16 codes and 1024 x 2^14, D = 256;
                                   GPU: 2048 rows x 2^18 codes x 256 (SEED-Voken's pretraining size)
    python bench/ibq.py --quick    tiny sizes (a smoke run)

Each case runs in its own forked child on the CPU (clean peak RSS, see bench/_measure.py); on a GPU, peak from
torch.cuda.max_memory_allocated, and the time also as a fraction of the tensor-core bound for 7 N K D multiply-adds
at the dense TF32 peak (the Triton kernels do 10: the sweep's L and P C, the column sums' L, rho's L, dz's L, dP
and dL C, dC's L, dP and dL^T z; float32 operands as three tf32 products). vaekernels runs with the default
backend (Triton on a GPU) and, on a GPU, the PyTorch backend ("vaekernels torch"). Where the dense formula's rows x
codes tensors would not fit the memory budget it runs at fewer rows, said so in the output.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import _measure  # noqa: E402
from _measure import fmt_bytes, fmt_time  # noqa: E402

MACS_PER_NKD = 7  # multiply-adds per row x code x channel that IBQ needs, forward + backward with entropy


def _inputs(n, k, d, device):
    g = torch.Generator().manual_seed(0)
    z = (torch.randn(n, d, generator=g) * 0.05).to(device).requires_grad_()
    cb = torch.randn(k, d, generator=g).to(device).requires_grad_()  # N(0, 1), as SEED-Voken's nn.Embedding
    return z, cb


def _vk_step(n, k, d, device, backend):
    import vaekernels as vk

    z, cb = _inputs(n, k, d, device)

    def step():
        with vk.use_backend(backend):
            r = vk.index_backprop_quantize(z, cb)
            (r.quantized.sum() + r.quant_loss + r.entropy_loss).backward()
        z.grad = cb.grad = None
    return step


def _dense_step(n, k, d, device):
    from tests.doubles.seed_voken import IndexPropagationQuantize

    q = IndexPropagationQuantize(k, d, use_entropy_loss=True).to(device)
    z, cb = _inputs(n, k, d, device)
    q.embedding.weight.data.copy_(cb.detach())
    x = z.detach().t().reshape(1, d, n, 1).requires_grad_()  # (B, D, H, W) as its einsums take it

    def step():
        z_q, (quant, _, _, entropy), _ = q(x)
        (z_q.sum() + quant + entropy).backward()
        x.grad = q.embedding.weight.grad = None
    return step


def _case(name, n, k, d, device_name, budget_s):
    device = torch.device(device_name)
    torch.set_num_threads(os.cpu_count() or 1)
    if name == "dense formula":
        step = _dense_step(n, k, d, device)
    else:  # "vaekernels" (the default backend) or "vaekernels <backend>"
        words = name.split()
        step = _vk_step(n, k, d, device, words[1] if len(words) == 2 else "auto")
    return {"status": "ok", **_measure.measure(step, device, budget_s, 1, 5)}


def _run(n, k, d, device, budget):
    dense_bytes = 9 * 4 * n * k  # about nine float32 rows x codes tensors
    dense_n = n
    while dense_bytes * dense_n // n > budget and dense_n > 256:
        dense_n //= 2
    cases = [("vaekernels", n)]
    if device.type == "cuda":
        cases.append(("vaekernels torch", n))
    cases.append(("dense formula", dense_n))
    print(f"\nIBQ with entropy, forward+backward: {k} codes x {d}, {n} rows, device {device}")
    if dense_n != n:
        print(f"dense formula at {dense_n} rows (its rows x codes tensors would pass the memory budget of "
              f"{fmt_bytes(budget)} at {n})")
    print("| implementation | rows | time (median) | peak memory |" + (" tensor-core bound |" if device.type == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for name, rows in cases:
        if device.type == "cpu":
            res = _measure.isolated(_case, (name, rows, k, d, "cpu", 20.0), timeout_s=1500)
        else:
            try:
                res = _case(name, rows, k, d, device.type, 5.0)
            except torch.OutOfMemoryError as e:
                res = {"status": "error", "note": f"out of memory ({e})"[:200]}
            torch.cuda.empty_cache()
        if res.get("status") != "ok":
            print(f"| {name} | {rows} | {res.get('note')} | |", flush=True)
            continue
        ms = res["times_ms"]["median"]
        line = f"| {name} | {rows} | {fmt_time(ms)} | {fmt_bytes(res['peak_bytes'])} |"
        if device.type == "cuda":
            peak = _measure.peak_tflops(torch.cuda.get_device_name(device))
            bound_s = MACS_PER_NKD * 2 * rows * k * d / (peak["tf32"] * 1e12) if peak else None
            line += f" {bound_s / (ms / 1e3):.1%} |" if bound_s else " n/a |"
        print(line, flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", help="one N,K,D instead of the defaults")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        sizes = [(256, 1024, 32)]
    elif args.size:
        sizes = [tuple(int(v) for v in args.size.split(","))]
    else:
        sizes = [(2048, 1 << 18, 256)] if device.type == "cuda" else [(4096, 1 << 16, 256), (1024, 1 << 14, 256)]
    budget = _measure.memory_budget(device)
    for n, k, d in sizes:
        _run(n, k, d, device, budget)


if __name__ == "__main__":
    main()
