"""`python -m vaekernels demo`: train the reference VAE and VQ-VAE on scikit-learn's 8x8 digits (no download)
with the fastest backend, report loss, the per-pixel reconstruction MSE on held-out digits, codebook perplexity
and usage, time per step against the same models running the eager formulas, and write a PNG of held-out inputs,
their reconstructions and samples from the VAE's prior."""
from __future__ import annotations

import argparse
import os
import time

import torch

from . import _backend
from .models import ConvVAE, ConvVQVAE


def load_digits(device: torch.device) -> torch.Tensor:
    """The 1797 8x8 digits bundled with scikit-learn, scaled to [0, 1], as (N, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits as sk_digits
    except ImportError as e:
        raise ImportError("the demo needs scikit-learn: pip install 'vaekernels[demo]'") from e
    x = torch.tensor(sk_digits().data, dtype=torch.float32) / 16.0
    return x.view(-1, 1, 8, 8).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model: torch.nn.Module, data: torch.Tensor, steps: int, batch: int = 128, desc: str = "",
          progress: bool = True) -> list[dict]:
    """Adam steps on random batches (with the model's `after_step` hook); returns each step's float metrics."""
    from tqdm import tqdm

    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator(device="cpu").manual_seed(0)
    history = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        x = data[torch.randint(0, data.shape[0], (batch,), generator=gen).to(data.device)]
        out = model(x)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        if hasattr(model, "after_step"):
            model.after_step(step)
        metrics = {k: float(v.detach()) for k, v in out.items() if torch.is_tensor(v) and v.dim() == 0}
        history.append(metrics)
        bar.set_postfix(loss=f"{metrics['loss']:.2f}")
    return history


def time_per_step(make_models: dict, data: torch.Tensor, steps: int) -> dict:
    """Median seconds per training step of each model, after a warm-up; the models take turns step by step, so
    that a busy machine slows them alike."""
    models = {}
    for name, make in make_models.items():
        torch.manual_seed(0)
        models[name] = make()
        train(models[name], data, 3, progress=False)
    times = {name: [] for name in models}
    for _ in range(steps):
        for name, model in models.items():
            _sync(data.device)
            t0 = time.perf_counter()
            train(model, data, 1, progress=False)
            _sync(data.device)
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


def _save_png(path: str, rows: dict[str, torch.Tensor]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 10
    fig, axes = plt.subplots(len(rows), n, figsize=(n, len(rows) * 1.1))
    for r, (name, images) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r, c]
            ax.imshow(images[c, 0].detach().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


HELD_OUT = 200  # the first digits of the set, never trained on: the reconstruction error is measured on them


def run(steps: int = 300, out_dir: str = "demo_out", device: str | None = None, timing_steps: int = 40) -> dict:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backend = _backend.resolve_name("vq_fwd", dev)
    print(f"vaekernels demo on {dev} with the {backend!r} backend (available: {_backend.available_backends()})")
    torch.manual_seed(0)
    digits = load_digits(dev)
    held_out, data = digits[:HELD_OUT], digits[HELD_OUT:]
    report = {"device": str(dev), "backend": backend}
    vae, vqvae = ConvVAE().to(dev), ConvVQVAE().to(dev)
    for name, model in (("VAE", vae), ("VQ-VAE", vqvae)):
        hist = train(model, data, steps, desc=f"training {name}")
        first, last = hist[0], sum(h["loss"] for h in hist[-10:]) / 10
        mse = float(torch.nn.functional.mse_loss(model.reconstruct(held_out), held_out))
        line = f"{name}: loss {first['loss']:.2f} -> {last:.2f}, held-out reconstruction MSE {mse:.4f} per pixel"
        report[name] = {"first_loss": first["loss"], "last_loss": last, "heldout_mse": mse}
        if name == "VQ-VAE":
            with torch.no_grad():
                idx = model.eval()(data)["indices"]
            used = torch.unique(idx).numel()
            probs = torch.bincount(idx.flatten(), minlength=model.quantizer.num_codes).float() / idx.numel()
            perplexity = float(torch.exp(-torch.special.xlogy(probs, probs).sum()))
            line += f", codebook perplexity {perplexity:.1f}, codes used {used}/{model.quantizer.num_codes}"
            report[name].update(perplexity=perplexity, codes_used=used)
        print(line)
    ratio = report["VAE"]["heldout_mse"] / report["VQ-VAE"]["heldout_mse"]
    print(f"held-out MSE, VAE / VQ-VAE: {ratio:.2f}")
    report["heldout_mse_ratio"] = ratio
    for name, cls in (("VAE", ConvVAE), ("VQ-VAE", ConvVQVAE)):
        t = time_per_step({"fused": lambda: cls().to(dev), "eager": lambda: cls(eager=True).to(dev)}, data,
                          timing_steps)
        fused, eager = t["fused"], t["eager"]
        print(f"{name}: {1e3 * fused:.2f} ms/step fused vs {1e3 * eager:.2f} ms/step eager ({eager / fused:.2f}x)")
        report[name].update(ms_per_step_fused=1e3 * fused, ms_per_step_eager=1e3 * eager)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "demo.png")
    x = held_out[:10]
    _save_png(path, {"held-out input": x, "VAE": vae.reconstruct(x), "VQ-VAE": vqvae.reconstruct(x),
                     "VAE sample": vae.sample(10)})
    print(f"wrote {path}")
    report["png"] = path
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m vaekernels demo", description=__doc__)
    p.add_argument("--steps", type=int, default=300, help="training steps per model")
    p.add_argument("--out", default="demo_out", help="folder for demo.png")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    args = p.parse_args(argv)
    run(args.steps, args.out, args.device)
