"""Peak memory and time of one forward+backward through the quantizers of well-known models, as shipped and
after vk.patch, at the shapes those projects train with.

    python bench/patch_memory.py [--quick] [--json PATH] [--repeat N]

Cases: VQGAN (diffusers' VectorQuantizer, the port of taming's VectorQuantizer2) with 1024 and 16384 codes of
256 dims on 16 images of 16x16 tokens; LlamaGen's tokenizer shape, 16384 codes of 8 dims on 65536 tokens;
vector-quantize-pytorch's VectorQuantize with its defaults (EMA codebook, rotation trick) at the VQGAN shape;
SoundStream/EnCodec, vector-quantize-pytorch's ResidualVQ with 8 quantizers of 1024 codes x 128 dims on
16 clips of 10 s at 75 frames/s. --quick uses small shapes (a few minutes on a 2-core CPU).

Every (case, mode) runs in a fresh subprocess. Peak memory is torch.cuda.max_memory_allocated above what was
allocated before the step on a GPU; on the CPU it is the process's peak resident set above its size before
the step (the peak is reset through /proc/self/clear_refs after a warm-up step; where that is not possible,
the first step is measured with getrusage). The child runs with a fixed glibc mmap threshold, so freed
blocks go back to the system at once and the resident set follows what is alive. Time is the best of
--repeat steps after that (the minimum resists other load on a shared machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

CASES = {  # name: (kind, codes, dim, input shape, quantizers)
    "vqgan-1024x256": ("vqgan", 1024, 256, (16, 256, 16, 16), 1),
    "vqgan-16384x256": ("vqgan", 16384, 256, (16, 256, 16, 16), 1),
    "llamagen-16384x8": ("vqgan", 16384, 8, (64, 8, 32, 32), 1),
    "vqpytorch-16384x256": ("vq", 16384, 256, (16, 256, 256), 1),
    "encodec-rvq-8x1024x128": ("rvq", 1024, 128, (16, 750, 128), 8),
}
QUICK_SHAPES = {
    "vqgan-1024x256": (2, 256, 16, 16),
    "vqgan-16384x256": (2, 256, 8, 8),
    "llamagen-16384x8": (4, 8, 16, 16),
    "vqpytorch-16384x256": (2, 64, 256),
    "encodec-rvq-8x1024x128": (4, 75, 128),
}


def _tokens(kind: str, shape) -> int:
    return shape[0] * shape[2] * shape[3] if kind == "vqgan" else shape[0] * shape[1]


def _build(kind, codes, dim, quantizers):
    """(module, objective) for one case: the loss a training loop would backpropagate."""
    if kind == "vqgan":
        from diffusers.models.autoencoders.vae import VectorQuantizer

        return VectorQuantizer(codes, dim, beta=0.25), lambda out: out[0].square().mean() + out[1]
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    if kind == "vq":  # (batch, tokens, dim) input, every option at its default
        return VectorQuantize(dim=dim, codebook_size=codes), lambda out: out[0].square().mean() + out[2].sum()

    module = ResidualVQ(dim=dim, num_quantizers=quantizers, codebook_size=codes)
    return module, lambda out: out[0].square().mean() + out[2].sum()


def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def _hwm_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(name: str, patched: bool, quick: bool, repeat: int) -> dict:
    import torch

    import vaekernels as vk

    kind, codes, dim, shape, quantizers = CASES[name]
    shape = QUICK_SHAPES[name] if quick else shape
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    torch.manual_seed(0)
    module, objective = _build(kind, codes, dim, quantizers)
    module.to(device).train()
    if patched:
        vk.patch(module)
    x = torch.randn(shape, device=device).requires_grad_()

    def zero_grad():  # outside the measured region: the previous step's gradients are freed first
        x.grad = None
        module.zero_grad(set_to_none=True)

    def step():
        objective(module(x)).backward()
        if cuda:
            torch.cuda.synchronize()

    if cuda:
        step()
        zero_grad()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        peak = torch.cuda.max_memory_allocated() - base
        method = "torch.cuda.max_memory_allocated"
    elif _reset_hwm():
        step()
        zero_grad()
        base = _rss_kb()
        _reset_hwm()
        step()
        peak = (_hwm_kb() - base) * 1024
        method = "peak RSS (/proc/self/clear_refs)"
    else:
        base = _rss_kb()
        step()
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
        method = "peak RSS (getrusage, first step)"
    times = []
    for _ in range(repeat):
        zero_grad()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return dict(case=name, patched=patched, shape=list(shape), tokens=_tokens(kind, shape), codes=codes, dim=dim,
                quantizers=quantizers, peak_mb=peak / 2**20, time_ms=1e3 * min(times),
                device=torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)", method=method,
                torch=torch.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (a few minutes on a 2-core CPU)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per case and mode (best of)")
    parser.add_argument("--case", choices=sorted(CASES), action="append", help="run only these cases")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--patched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.patched, args.quick, args.repeat)))
        return

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])),
               MALLOC_MMAP_THRESHOLD_="65536")
    results = []
    header = f"{'case':24} {'tokens':>7} {'mode':>9} {'peak MB':>9} {'ms':>9}"
    print(header)
    for name in args.case or CASES:
        for patched in (False, True):
            cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--repeat", str(args.repeat)]
            cmd += ["--patched"] * patched + ["--quick"] * args.quick
            out = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{name} ({'patched' if patched else 'unpatched'}) failed:\n{out.stderr}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results.append(r)
            print(f"{name:24} {r['tokens']:>7} {'patched' if patched else 'original':>9} "
                  f"{r['peak_mb']:>9.1f} {r['time_ms']:>9.1f}")
        before, after = results[-2], results[-1]
        print(f"{'':24} {'':>7} {'ratio':>9} {before['peak_mb'] / max(after['peak_mb'], 1e-9):>8.1f}x "
              f"{before['time_ms'] / after['time_ms']:>8.2f}x")
    print(f"device: {results[0]['device']}, memory: {results[0]['method']}, torch {results[0]['torch']}, "
          f"{platform.python_implementation()} {platform.python_version()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
