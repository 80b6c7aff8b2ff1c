"""LFQ / BSQ entropy loss, forward + backward: vk.lookup_free_quantize against vector-quantize-pytorch's LFQ.

    python bench/lfq.py            CPU: 2^16 codes x 4096 tokens; GPU: 2^18 codes x 16384 tokens
    python bench/lfq.py --quick    tiny sizes (a smoke run)

Each case runs in its own forked child on the CPU (clean peak RSS, see bench/_measure.py); on a GPU, peak from
torch.cuda.max_memory_allocated and the time also as a fraction of the tensor-core bound for N * 2^K * K
multiply-adds (dense float32 TF32 peak). vaekernels runs both entropies: "exact" (its default) and "clamped"
(vector-quantize-pytorch's formula, what vk.patch uses); on a GPU both with the default backend (Triton) and with
the PyTorch backend ("vaekernels torch ..."). vector-quantize-pytorch runs the same step
(training mode, entropy loss and commitment loss, backward to the input); where its tokens x codes matrices
would not fit the memory budget it runs at a smaller token count, said so in the output.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import _measure  # noqa: E402


def _input(n, k, device):
    return (torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * 0.1).to(device).requires_grad_()


def _vk_step(n, k, device, entropy, backend):
    import vaekernels as vk

    x = _input(n, k, device)

    def step():
        with vk.use_backend(backend):
            r = vk.lookup_free_quantize(x, inv_temperature=100.0, entropy=entropy)
            (r.quantized.sum() + r.entropy_loss + r.commitment_loss).backward()
        x.grad = None
    return step


def _vqp_step(n, k, device):
    from vector_quantize_pytorch import LFQ

    lfq = LFQ(dim=k, codebook_size=2 ** k, commitment_loss_weight=1.0, entropy_loss_weight=1.0).to(device).train()
    x = _input(n, k, device)[None]

    def step():
        q, _, loss = lfq(x)
        (q.sum() + loss).backward()
        x.grad = None
    return step


def _case(name, n, k, device_name, budget_s):
    device = torch.device(device_name)
    torch.set_num_threads(os.cpu_count() or 1)
    if name == "vector-quantize-pytorch":
        step = _vqp_step(n, k, device)
    else:  # "vaekernels <entropy>" (the default backend) or "vaekernels <backend> <entropy>"
        words = name.split()
        step = _vk_step(n, k, device, words[-1], words[1] if len(words) == 3 else "auto")
    result = _measure.measure(step, device, budget_s, 1, 5)
    return {"status": "ok", **result}


def _fmt_time(ms):
    return f"{ms / 1e3:.2f} s" if ms >= 1e3 else f"{ms:.1f} ms"


def _fmt_mem(b):
    if b is None:
        return "n/a"
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.quick:
        n, k = 256, 8
    else:
        n, k = (16384, 18) if device.type == "cuda" else (4096, 16)
    budget = _measure.memory_budget(device)
    dense_bytes = 4 * 4 * n * 2 ** k  # the library keeps about four tokens x codes float32 tensors alive
    vqp_n = n
    while dense_bytes * vqp_n // n > budget and vqp_n > 256:
        vqp_n //= 2
    cases = [("vaekernels exact", n), ("vaekernels clamped", n)]
    if device.type == "cuda":  # the Triton kernels against the PyTorch backend's GEMMs of per-bit factor tables
        cases += [("vaekernels torch exact", n), ("vaekernels torch clamped", n)]
    cases.append(("vector-quantize-pytorch", vqp_n))
    print(f"LFQ entropy loss forward+backward, 2^{k} codes, device {_measure.device_name(device) if hasattr(_measure, 'device_name') else device}")
    if vqp_n != n:
        print(f"vector-quantize-pytorch at {vqp_n} tokens (its tokens x codes tensors would pass the memory budget "
              f"of {_fmt_mem(budget)} at {n})")
    rows = []
    for name, tokens in cases:
        if device.type == "cpu":
            res = _measure.isolated(_case, (name, tokens, k, "cpu", 20.0), timeout_s=900)
        else:
            try:
                res = _case(name, tokens, k, args.device, 5.0)
            except torch.OutOfMemoryError as e:
                res = {"status": "error", "note": f"out of memory ({e})"[:200]}
            torch.cuda.empty_cache()
        rows.append((name, tokens, res))
    print("| implementation | tokens | time (median) | peak memory |" + (" tensor-core bound |" if device.type == "cuda" else ""))
    print("|---|---|---|---|" + ("---|" if device.type == "cuda" else ""))
    for name, tokens, res in rows:
        if res.get("status") != "ok":
            print(f"| {name} | {tokens} | {res.get('note')} | |")
            continue
        ms = res["times_ms"]["median"]
        line = f"| {name} | {tokens} | {_fmt_time(ms)} | {_fmt_mem(res['peak_bytes'])} |"
        if device.type == "cuda":
            peak = _measure.peak_tflops(torch.cuda.get_device_name(device))
            if peak:
                bound_s = tokens * 2 ** k * k * 2 / (peak["tf32"] * 1e12) if isinstance(peak, dict) and "tf32" in peak else None
                line += f" {bound_s / (ms / 1e3):.1%} |" if bound_s else " n/a |"
            else:
                line += " n/a |"
        print(line)


if __name__ == "__main__":
    main()
