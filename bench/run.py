"""The benchmark command: every vaekernels op, forward and forward+backward, on named realistic shapes, against the
eager PyTorch formula, torch.compile of it, each vaekernels backend and the libraries people use instead.

    python bench/run.py [--quick] [--device auto|cpu|cuda] [--ops a,b] [--shapes a,b] [--competitors a,b]
                        [--json PATH] [--markdown [PATH]] [--plot PATH] [--save] [--from-json PATH] [--cpu-compile]
                        [--dispatch] [--readme] [--first-contact]

Defaults to the GPU when there is one (the shapes the models train with), else the CPU with CPU-sized shapes
(the two issue-2 figures keep their full size; torch.compile only with --cpu-compile, as compiling would take
longer than the rest). --quick: tiny shapes of one set per code path, every comparison once (CI smoke test).
Prints a table of speedups against the eager formula and writes JSON (default bench/out/results-<device>.json);
--markdown writes (or prints) the self-contained table block README's performance section is made of; --save
writes JSON, markdown and plot under bench/results/ (see bench/results/README.md); --from-json renders a saved run;
--dispatch writes the GPU's per-op, per-size backend choice for "auto" into vaekernels/dispatch.json (dispatch.py);
--readme regenerates README's performance block for the run's device kind (headline table, link to the full one);
--first-contact measures only the first GPU contact's numbers (one shape per op, shapes.FIRST_CONTACT).

Each comparison fails soft: a failing alternative becomes an error string in its row. On the CPU every
comparison runs in a forked child (fresh peak-RSS measurement, an address-space cap, a time limit); the parent
never runs torch work itself, so forking stays safe.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import sys
from typing import Callable

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
for path in (BENCH, ROOT):  # the working tree's vaekernels, even when it is not installed
    if path not in sys.path:
        sys.path.insert(0 if path == BENCH else 1, path)

import torch  # noqa: E402
from torch import nn  # noqa: E402

import _measure  # noqa: E402
import dispatch  # noqa: E402
import vaekernels as vk  # noqa: E402
from shapes import FIRST_CONTACT, MODES, OPS, QUICK_SETS, VAE_OPS, Codes, Latent, ShapeSet, shape_sets  # noqa: E402
from vaekernels import _backend, eager  # noqa: E402


class Skip(Exception):
    """A comparison that does not apply here; `status` is "skipped" or "not installed"."""

    def __init__(self, note: str, status: str = "skipped"):
        super().__init__(note)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Plan:
    """Where and how long to measure."""

    device: torch.device
    size: str  # "gpu" | "cpu" | "quick" (shapes.SIZES)
    budget_s: float  # timing budget per comparison
    min_runs: int
    max_runs: int
    timeout_s: float  # per comparison, CPU children only
    cpu_compile: bool = False  # run torch.compile on the CPU too (first shape of each set)

    @classmethod
    def make(cls, device: torch.device, quick: bool, timeout_s: float | None = None, cpu_compile: bool = False):
        if quick:
            return cls(device, "quick", 0.05, 1, 3, timeout_s or 120, cpu_compile)
        if device.type == "cuda":
            return cls(device, "gpu", 0.1, 10, 200, timeout_s or 600)
        return cls(device, "cpu", 1.0, 3, 30, timeout_s or 900, cpu_compile)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement target: op and mode on one shape of a set (`index`: its position in the set)."""

    op: str
    mode: str
    set: ShapeSet
    shape: Latent | Codes
    index: int

    def describe(self) -> str:
        return f"{self.op} {self.mode} {self.set.name} {self.shape.label}"


# ------------------------------------------------------------------ inputs and the formulas being compared


def _latents(case: Case, device) -> tuple[torch.Tensor, torch.Tensor]:
    grad = case.mode == "fwdbwd"
    mu = torch.randn(case.shape.shape, device=device).requires_grad_(grad)
    logvar = (0.5 * torch.randn(case.shape.shape, device=device)).requires_grad_(grad)
    return mu, logvar


def _z(case: Case, device) -> torch.Tensor:
    return torch.randn(case.shape.shape, device=device).requires_grad_(case.mode == "fwdbwd")


def _codebook(case: Case, device) -> torch.Tensor:
    s = case.shape
    return torch.randn(s.codes, s.d, device=device).requires_grad_(case.mode == "fwdbwd")


def _rows(z: torch.Tensor, dim: int) -> torch.Tensor:
    return z.movedim(dim, -1).reshape(-1, z.shape[dim])


def _is_image(shape: Codes) -> bool:
    return len(shape.shape) == 4 and shape.dim == 1


def _quantized_and_loss(result) -> list[torch.Tensor]:
    """(quantized, loss) from eager's, vaekernels' and vector-quantize-pytorch's (quantized, indices, loss, ...)."""
    return [result[0], result[2]]


EAGER_FORMULAS = {
    "reparameterize": lambda mu, lv: [eager.reparameterize(mu, lv)],
    "gaussian_kl": lambda mu, lv: [eager.gaussian_kl(mu, lv)],
    "reparameterize_kl": lambda mu, lv: [eager.reparameterize(mu, lv), eager.gaussian_kl(mu, lv)],
    "nearest_code": lambda z, cb, dim: [eager.nearest_code(z, cb, dim=dim)],
    "vector_quantize": lambda z, cb, dim: _quantized_and_loss(eager.vector_quantize(z, cb, dim=dim)),
}


def vk_formulas(precision: str) -> dict[str, Callable]:
    return {
        "reparameterize": lambda mu, lv: [vk.reparameterize(mu, lv)],
        "gaussian_kl": lambda mu, lv: [vk.gaussian_kl(mu, lv)],
        "reparameterize_kl": lambda mu, lv: list(vk.reparameterize_kl(mu, lv)),
        "nearest_code": lambda z, cb, dim: [vk.nearest_code(z, cb, dim=dim, precision=precision)],
        "vector_quantize": lambda z, cb, dim: _quantized_and_loss(
            vk.vector_quantize(z, cb, dim=dim, precision=precision)),
    }


class EagerEMAQuantizer(nn.Module):
    """The EMA quantizer as usually written (Sonnet's VectorQuantizerEMA), `stages` residual stages: the eager
    cdist/argmin formula, then counts and sums through an N x K one-hot (eager.ema_statistics)."""

    def __init__(self, stages: int, codes: int, code_dim: int, dim: int, decay: float = 0.99, eps: float = 1e-5):
        super().__init__()
        self.dim, self.decay, self.eps = dim, decay, eps
        self.register_buffer("codebook", torch.randn(stages, codes, code_dim))
        self.register_buffer("cluster_size", torch.zeros(stages, codes))
        self.register_buffer("embed_sum", self.codebook.clone())

    def forward(self, z: torch.Tensor):
        residual, quantized, loss, indices = z, torch.zeros_like(z), 0.0, []
        for stage, codebook in enumerate(self.codebook):
            q, idx, stage_loss = eager.vector_quantize(residual, codebook, dim=self.dim)
            if self.training:
                self._update(stage, _rows(residual.detach(), self.dim), idx.reshape(-1))
            residual = residual - q.detach()
            quantized, loss = quantized + q, loss + stage_loss
            indices.append(idx)
        return quantized, torch.stack(indices, -1), loss

    @torch.no_grad()
    def _update(self, stage: int, rows: torch.Tensor, idx: torch.Tensor) -> None:
        counts, sums = eager.ema_statistics(rows, idx, self.codebook.shape[1])
        size, total = self.cluster_size[stage], self.embed_sum[stage]
        size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        total.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = size.sum()
        smoothed = (size + self.eps) / (n + size.numel() * self.eps) * n
        self.codebook[stage].copy_(total / smoothed.unsqueeze(1))


def _eager_module(shape: Codes, competitor) -> nn.Module:
    return EagerEMAQuantizer(shape.stages, shape.codes, shape.d, shape.dim)


def _vk_module(shape: Codes, competitor) -> nn.Module:
    kwargs = dict(ema=True, decay=0.99, dim=shape.dim, precision=competitor.precision)
    if shape.stages == 1:
        return vk.nn.VectorQuantizer(shape.codes, shape.d, **kwargs)
    return vk.nn.ResidualVectorQuantizer(shape.stages, shape.codes, shape.d, **kwargs)


# ------------------------------------------------------------------ competitors: builders of (forward, leaves)


def _formula_builder(formulas: Callable, module_factory: Callable, wrap: Callable = lambda f: f):
    """Builder running `formulas(competitor)[op]` on fresh inputs, or `module_factory` for vq_module."""

    def build(case: Case, plan: Plan, competitor):
        device = plan.device
        if case.op == "vq_module":
            module = wrap(module_factory(case.shape, competitor).to(device).train())
            z = _z(case, device)
            return (lambda: _quantized_and_loss(module(z))), [z, *module.parameters()]
        fn = wrap(formulas(competitor)[case.op])
        if case.op in VAE_OPS:
            mu, logvar = _latents(case, device)
            return (lambda: fn(mu, logvar)), [mu, logvar]
        z, codebook, dim = _z(case, device), _codebook(case, device), case.shape.dim
        return (lambda: fn(z, codebook, dim)), [z, codebook]

    return build


_build_eager = _formula_builder(lambda c: EAGER_FORMULAS, _eager_module)
_build_vk = _formula_builder(lambda c: vk_formulas(c.precision), _vk_module)
_build_compiled_formula = _formula_builder(lambda c: EAGER_FORMULAS, _eager_module,
                                           wrap=lambda f: torch.compile(f, dynamic=False))


def _build_compiled(case: Case, plan: Plan, competitor):
    """torch.compile of the eager formula, static shapes, compiled afresh per case (warm-up includes compiling)."""
    if plan.size == "quick" and (case.mode != "fwd" or case.op != case.set.ops[0]):
        raise Skip("--quick compiles one graph per shape set (the forward of its first op): compiling takes "
                   "seconds per graph")
    if plan.device.type == "cpu":
        if not plan.cpu_compile:
            raise Skip("torch.compile is not run on the CPU by default: compiling takes 10-60 s per graph on a "
                       "few cores; --cpu-compile runs it at the first shape of each set")
        if case.index:
            raise Skip("torch.compile on the CPU runs at the first shape of each set only (compile time)")
        import torch._inductor.config

        torch._inductor.config.compile_threads = 1  # no worker pool per forked child
    torch._dynamo.reset()
    return _build_compiled_formula(case, plan, competitor)


def _build_diffusers(case: Case, plan: Plan, competitor):
    """diffusers' DiagonalGaussianDistribution (sample / kl of (B, 2C, H, W) parameters) and VectorQuantizer."""
    from diffusers.models.autoencoders import vae

    device = plan.device
    if case.op in VAE_OPS:
        if len(case.shape.shape) != 4:
            raise Skip("DiagonalGaussianDistribution takes 4-D (B, 2C, H, W) parameters")
        params = torch.cat(_latents(case, device), 1).detach().requires_grad_(case.mode == "fwdbwd")

        def forward():
            posterior = vae.DiagonalGaussianDistribution(params)
            if case.op == "reparameterize":
                return [posterior.sample()]
            if case.op == "gaussian_kl":
                return [posterior.kl()]
            return [posterior.sample(), posterior.kl()]

        return forward, [params]
    s = case.shape
    module = vae.VectorQuantizer(s.codes, s.d, beta=0.25).to(device).train()
    z = _z(case, device)
    # NCHW as the module expects; row data as a (1, D, 1, N) view whose NHWC permute is contiguous
    x = z if _is_image(s) else _rows(z, s.dim).view(1, 1, s.n, s.d).permute(0, 3, 1, 2)
    return (lambda: list(module(x)[:2])), [z, *module.parameters()]


def _build_vqpytorch(case: Case, plan: Plan, competitor):
    """vector-quantize-pytorch: VectorQuantize with a learned codebook and the straight-through estimator for
    vector_quantize; EMA VectorQuantize / ResidualVQ for vq_module (rotation trick off, as the others)."""
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    s = case.shape
    common = dict(commitment_weight=0.25, rotation_trick=False, accept_image_fmap=_is_image(s))
    if case.op == "vector_quantize":
        module = VectorQuantize(dim=s.d, codebook_size=s.codes, learnable_codebook=True, ema_update=False, **common)
    elif s.stages == 1:
        module = VectorQuantize(dim=s.d, codebook_size=s.codes, decay=0.99, **common)
    else:
        module = ResidualVQ(dim=s.d, num_quantizers=s.stages, codebook_size=s.codes, decay=0.99, **common)
    module = module.to(plan.device).train()
    z = _z(case, plan.device)
    x = z.unsqueeze(0) if z.dim() == 2 else z
    return (lambda: _quantized_and_loss(module(x))), [z, *module.parameters()]


def _build_faiss(case: Case, plan: Plan, competitor):
    """FAISS exact search (IndexFlatL2, k=1; on the GPU GpuIndexFlatL2), rebuilt every step as in training."""
    import faiss
    import faiss.contrib.torch_utils  # noqa: F401 - lets indexes take torch tensors

    s = case.shape
    if plan.device.type == "cuda":
        if not hasattr(faiss, "StandardGpuResources"):
            raise Skip("this faiss build has no GPU support (faiss-cpu)")
        index = faiss.GpuIndexFlatL2(faiss.StandardGpuResources(), s.d)
    else:
        index = faiss.IndexFlatL2(s.d)
    z, codebook = _z(case, plan.device), _codebook(case, plan.device)

    def forward():
        index.reset()
        index.add(codebook)
        return [index.search(_rows(z, s.dim).contiguous(), 1)[1]]

    return forward, [z, codebook]


def _build_keops(case: Case, plan: Plan, competitor):
    """pykeops: argmin over j of the symbolic ||z_i - e_j||^2 (never materialised)."""
    from pykeops.torch import LazyTensor

    s = case.shape
    z, codebook = _z(case, plan.device), _codebook(case, plan.device)

    def forward():
        x_i = LazyTensor(_rows(z, s.dim).contiguous()[:, None, :])
        e_j = LazyTensor(codebook[None, :, :])
        return [((x_i - e_j) ** 2).sum(-1).argmin(dim=1)]

    return forward, [z, codebook]


@dataclasses.dataclass(frozen=True)
class Competitor:
    """One alternative: the ops it covers, how to build a case, and what it needs."""

    name: str
    ops: tuple[str, ...]
    build: Callable
    backend: str = "auto"  # vaekernels backend selected while measuring
    precision: str = "exact"
    package: str | None = None  # import name of the library it needs
    dense: bool = False  # materialises the N x K distances: skipped where they would not fit

    @property
    def is_baseline(self) -> bool:
        """Part of the eager-vs-vaekernels comparison (the only one `baseline_only` sets run)."""
        return self.name == "eager" or self.name.startswith("vaekernels")

    def unavailable(self, device: torch.device) -> tuple[str, str] | None:
        """(status, reason) when this competitor cannot run on `device` at all, else None."""
        if self.package and importlib.util.find_spec(self.package) is None:
            return "not installed", f"{self.package} is not installed"
        if self.name.startswith("vaekernels"):
            ok, why = _backend.availability(self.backend)
            if not ok:
                return "skipped", why
            if device.type != "cuda" and self.backend != "torch":
                return "skipped", (f"{self.backend} runs CPU tensors through Triton's interpreter: a correctness "
                                   "tool, not a performance path")
            if device.type != "cuda" and self.precision != "exact":
                return "skipped", f"precision={self.precision!r} matters on GPUs only"
        return None


COMPETITORS = (
    Competitor("eager", OPS, _build_eager, dense=True),
    Competitor("torch.compile", OPS, _build_compiled, dense=True),
    *(Competitor(f"vaekernels[{b}]", OPS, _build_vk, backend=b) for b in ("cuda", "triton", "torch")),
    *(Competitor(f"vaekernels[{b},tf32]", ("nearest_code",), _build_vk, backend=b, precision="tf32")
      for b in ("cuda", "triton")),
    Competitor("vector-quantize-pytorch", ("vector_quantize", "vq_module"), _build_vqpytorch,
               package="vector_quantize_pytorch", dense=True),
    Competitor("diffusers", VAE_OPS + ("vector_quantize",), _build_diffusers, package="diffusers", dense=True),
    Competitor("faiss", ("nearest_code",), _build_faiss, package="faiss"),
    Competitor("pykeops", ("nearest_code",), _build_keops, package="pykeops"),
)
BY_NAME = {c.name: c for c in COMPETITORS}


# ------------------------------------------------------------------ running one comparison


def make_step(forward: Callable, leaves: list, mode: str) -> Callable[[], None]:
    """One training-style step: forward under no_grad ("fwd"), or forward then backward with ones as the
    upstream gradient of every output ("fwdbwd"; leaves' gradients are dropped first, not accumulated)."""
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()

        return step
    grads: list[torch.Tensor] = []

    def step():
        for t in leaves:
            t.grad = None
        outputs = forward()
        if not grads:
            grads.extend(torch.ones_like(o) for o in outputs)
        torch.autograd.backward(outputs, grads)

    return step


def build_step(case: Case, plan: Plan, competitor: Competitor) -> Callable[[], None]:
    """The step for one comparison, or Skip when it does not apply (memory guard included)."""
    if competitor.dense and isinstance(case.shape, Codes):
        budget = _measure.memory_budget(plan.device)
        if case.shape.dense_bytes > budget:
            raise Skip(f"would need {case.shape.dense_bytes / _measure.GiB:.1f} GiB (N*K*4 bytes*3), over the "
                       f"{budget / _measure.GiB:.1f} GiB this machine can give a case")
    torch.manual_seed(0)
    forward, leaves = competitor.build(case, plan, competitor)
    return make_step(forward, leaves, case.mode)


def run_comparison(case: Case, competitor: Competitor, plan: Plan) -> dict:
    """Measure one comparison; every failure becomes a status and a note."""
    try:
        with vk.use_backend(competitor.backend):
            step = build_step(case, plan, competitor)
            return {"status": "ok", **_measure.measure(step, plan.device, plan.budget_s, plan.min_runs, plan.max_runs)}
    except Skip as e:
        return {"status": e.status, "note": str(e)}
    except Exception as e:  # noqa: BLE001 - fail soft: the error is the result of this comparison
        return {"status": "error", "note": f"{type(e).__name__}: {e}".strip()}


def execute(fn: Callable, args: tuple, plan: Plan) -> dict:
    """fn(*args) in a forked child on the CPU (fresh peak RSS, memory cap, time limit), in-process on a GPU
    (then its tensors are freed and the cache emptied, so the next case's memory guard sees the free memory)."""
    if plan.device.type == "cuda":
        result = fn(*args)
        gc.collect()
        torch.cuda.empty_cache()
        return result
    return _measure.isolated(fn, args, plan.timeout_s, memory_limit=_measure.memory_budget(plan.device))


def cases(sets: dict[str, ShapeSet], ops: tuple[str, ...]) -> list[Case]:
    return [Case(op, mode, s, shape, i) for s in sets.values() for i, shape in enumerate(s.shapes)
            for op in ops for mode in MODES if s.runs(op, mode)]


def comparisons(all_cases: list[Case], competitors: tuple[Competitor, ...]) -> list[tuple[Case, Competitor]]:
    return [(case, c) for case in all_cases for c in competitors
            if case.op in c.ops and (c.is_baseline or not case.set.baseline_only)]


def _row(case: Case, competitor: Competitor, result: dict) -> dict:
    s = case.shape
    row = {"op": case.op, "mode": case.mode, "set": case.set.name, "shape": s.label, "index": case.index,
           "competitor": competitor.name, "backend": competitor.backend, "precision": competitor.precision}
    if isinstance(s, Latent):
        row.update(dims=list(s.shape), size=s.numel, bytes=s.numel * 4 * ELEMENT_TRAFFIC[case.op, case.mode])
    else:
        row.update(dims={"shape": list(s.shape), "dim": s.dim, "N": s.n, "D": s.d, "K": s.codes, "Q": s.stages},
                   size=s.search_flops(case.op), flops=s.search_flops(case.op))
    return {**row, **result}


# minimal float32 tensors moved per element (design.md, "Performance model"): reparameterize reads mu, logvar and
# writes z, its backward reads dz, logvar and writes dlogvar (dmu is dz); the KL reads mu, logvar, its backward
# also writes dmu, dlogvar; fused, the backward reads dz, mu, logvar and writes dmu, dlogvar
ELEMENT_TRAFFIC = {
    ("reparameterize", "fwd"): 3, ("reparameterize", "fwdbwd"): 6,
    ("gaussian_kl", "fwd"): 2, ("gaussian_kl", "fwdbwd"): 6,
    ("reparameterize_kl", "fwd"): 3, ("reparameterize_kl", "fwdbwd"): 8,
}


def annotate(rows: list[dict], copy_bw: float | None, peaks: dict | None) -> None:
    """Add speedup and memory ratio against eager, bandwidth % of the measured copy, search FLOP/s % of peak."""
    base = {(r["op"], r["mode"], r["set"], r["shape"]): r for r in rows
            if r["competitor"] == "eager" and r["status"] == "ok"}
    for r in rows:
        if r["status"] != "ok":
            continue
        seconds = r["times_ms"]["median"] / 1e3
        b = base.get((r["op"], r["mode"], r["set"], r["shape"]))
        r["speedup"] = b["times_ms"]["median"] / r["times_ms"]["median"] if b else None
        ok_mem = b and b["peak_bytes"] and r["peak_bytes"] is not None
        r["memory_ratio"] = r["peak_bytes"] / b["peak_bytes"] if ok_mem else None
        if "bytes" in r:
            r["bandwidth_gbps"] = r["bytes"] / seconds / 1e9
            r["bandwidth_pct"] = 100 * r["bytes"] / seconds / copy_bw if copy_bw else None
        else:
            r["tflops"] = r["flops"] / seconds / 1e12
            peak = peaks and peaks["tf32" if r["precision"] == "tf32" else "fp32"]
            r["peak_pct"] = 100 * r["tflops"] / peak if peak else None


# ------------------------------------------------------------------ whole-run measurements


def _copy_bandwidth(device: torch.device) -> dict:
    return {"status": "ok", "bytes_per_s": _measure.copy_bandwidth(device), "threads": torch.get_num_threads()}


LAUNCH_CASE = ("reparameterize_kl", Latent((64, 128)))


def launch_counts(plan: Plan, competitors: tuple[Competitor, ...]) -> dict:
    """Kernels launched by one forward+backward of reparameterize_kl on 64x128 latents (GPU only)."""
    if plan.device.type != "cuda":
        return {"note": "n/a (CPU: no kernel launches)"}
    op, shape = LAUNCH_CASE
    case = Case(op, "fwdbwd", ShapeSet("launches", "kernel launch count", (shape,)), shape, 0)
    counts = {}
    for c in competitors:
        if op not in c.ops or not (c.is_baseline or c.name == "torch.compile"):
            continue
        missing = c.unavailable(plan.device)
        if missing:
            counts[c.name] = {"status": missing[0], "note": missing[1]}
            continue
        try:
            with vk.use_backend(c.backend):
                step = build_step(case, plan, c)
                for _ in range(3):
                    step()
                counts[c.name] = {"status": "ok", **_measure.count_kernels(step)}
        except Exception as e:  # noqa: BLE001
            counts[c.name] = {"status": "error", "note": f"{type(e).__name__}: {e}"}
    return {"case": f"{op} fwdbwd {shape.label}", "counts": counts}


def issue2_figures(rows: list[dict]) -> dict:
    """The two figures issue 2 asks for, from the issue2 set's rows: time and peak memory of vaekernels and eager
    at its first shape (targets: speed ratio >= 1.0x, memory ratio <= 15%) and at its second (peak < 1 GiB)."""
    sel = [r for r in rows if r["set"] == "issue2" and r["op"] == "vector_quantize" and r["mode"] == "fwdbwd"]
    figures = {}
    for index, name in ((0, "speed"), (1, "memory")):
        here = {r["competitor"]: r for r in sel if r["index"] == index}
        if here:
            figures[name] = {"shape": next(iter(here.values()))["shape"],
                             **{n: _figure_cell(r) for n, r in here.items() if r["status"] != "not installed"}}
    return figures


def _figure_cell(r: dict) -> dict:
    if r["status"] != "ok":
        return {"status": r["status"], "note": r.get("note")}
    return {"status": "ok", "median_ms": r["times_ms"]["median"], "peak_bytes": r["peak_bytes"],
            "speedup": r.get("speedup"), "memory_ratio": r.get("memory_ratio")}


# ------------------------------------------------------------------ formatting: console, markdown, plot


def fmt_time(ms: float) -> str:
    if ms < 1:
        return f"{ms * 1e3:.1f} µs"
    return f"{ms:.2f} ms" if ms < 1e3 else f"{ms / 1e3:.2f} s"


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


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
    """The issue-2 figures and the kernel launch counts in words."""
    lines, bullet = [], "- " if markdown else ""
    targets = {"speed": "targets: speed ratio ≥ 1.0×, memory ratio ≤ 15%", "memory": "target: peak < 1 GiB"}
    for name, fig in issue2_figures(data["results"]).items():
        eager_cell = fig.get("eager", {"status": "absent", "note": "not run"})
        for competitor, cell in fig.items():
            if not competitor.startswith("vaekernels") or cell["status"] == "skipped":
                continue
            ratios = [f"speed ratio {cell['speedup']:.2f}×" if cell.get("speedup") else "",
                      f"memory ratio {100 * cell['memory_ratio']:.1f}%" if cell.get("memory_ratio") else ""]
            lines.append(f"{bullet}Issue 2, vector_quantize fwd+bwd {fig['shape']} ({targets[name]}): "
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
    """README's block for one run: per op, set and mode at the set's largest shape, the eager time, the best
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


def update_readme(path: str, kind: str, block: str) -> None:
    """Replace README's generated block for `kind` ("cpu" or "cuda"), between its two marker comments."""
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if start not in text or end not in text:
        raise SystemExit(f"{path} has no {start} ... {end} block to replace")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    _write(path, f"{head}{start}\n{block}{end}{tail}")


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


# ------------------------------------------------------------------ the command


def device_tag(meta: dict) -> str:
    """The device in file names, as bench/gpu_check.sh writes it (spaces as underscores), or "cpu"."""
    return meta["device"].replace(" ", "_") if meta["kind"] == "cuda" else "cpu"


def _names(value: str | None, known, what: str) -> list[str] | None:
    if value is None:
        return None
    names = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [n for n in names if not any(k == n or k.startswith(n) for k in known)]
    if unknown:
        raise SystemExit(f"unknown {what}: {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def _preload(competitors) -> None:
    """Import what the children will need once, in the parent (imports only: no torch work before forking)."""
    import torch._dynamo  # noqa: F401

    modules = {"diffusers": "diffusers.models.autoencoders.vae", "vector_quantize_pytorch": "vector_quantize_pytorch"}
    for c in competitors:
        if c.package in modules and importlib.util.find_spec(c.package):
            importlib.import_module(modules[c.package])


def benchmark(plan: Plan, ops, set_names, competitor_names, progress: bool = True,
              first_contact: bool = False) -> dict:
    """Run the selected comparisons (with `first_contact`, only those at the shapes of shapes.FIRST_CONTACT); the
    whole result as a JSON-ready dict."""
    from tqdm import tqdm

    sets = shape_sets(plan.size)
    set_names = set_names or (QUICK_SETS if plan.size == "quick" else None)
    if set_names:
        sets = {n: s for n, s in sets.items() if n in set_names}
    competitors = tuple(c for c in COMPETITORS if not competitor_names or c.name == "eager"  # the baseline, always
                        or any(c.name == n or c.name.startswith(n) for n in competitor_names))
    selected = cases(sets, tuple(ops or OPS))
    if first_contact:
        selected = [c for c in selected if (c.op, c.set.name, c.shape.label) in FIRST_CONTACT]
        if not selected:
            raise SystemExit("--first-contact: no shape of shapes.FIRST_CONTACT is among this device's (they are "
                             "GPU-size): run it on a GPU")
        sets = {n: s for n, s in sets.items() if any(c.set.name == n for c in selected)}
    jobs = comparisons(selected, competitors)
    if plan.device.type == "cpu":
        _preload(competitors)
    meta = _measure.device_info(plan.device)
    copy = execute(_copy_bandwidth, (plan.device,), plan)
    peaks = _measure.peak_tflops(meta["device"]) if plan.device.type == "cuda" else None
    meta.update(shape_size=plan.size, shape_sets={n: s.description for n, s in sets.items()},
                torch_threads=copy.get("threads"),
                copy_bandwidth_gbps=copy["bytes_per_s"] / 1e9 if copy["status"] == "ok" else None,
                peak_tflops=peaks, vaekernels=vk.__version__,
                memory_method=("torch.cuda.max_memory_allocated above baseline" if plan.device.type == "cuda"
                               else "peak RSS above baseline, one forked child per comparison"),
                timer=("CUDA events, L2 flushed before each step" if plan.device.type == "cuda"
                       else "wall clock, repeated steps"),
                competitors={c.name: (dict(zip(("status", "note"), c.unavailable(plan.device)))
                                      if c.unavailable(plan.device) else {"status": "available"})
                             for c in competitors})
    rows = []
    bar = tqdm(jobs, desc="bench", unit="cmp", dynamic_ncols=True, disable=not progress)
    for case, competitor in bar:
        bar.set_postfix_str(f"{case.describe()} · {competitor.name}")
        missing = competitor.unavailable(plan.device)
        if missing:
            result = {"status": missing[0], "note": missing[1]}
        else:
            result = execute(run_comparison, (case, competitor, plan), plan)
        rows.append(_row(case, competitor, result))
    bar.close()
    annotate(rows, copy.get("bytes_per_s"), peaks)
    return {"meta": meta, "results": rows, "figures": issue2_figures(rows),
            "launches": launch_counts(plan, competitors)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes, every comparison once (CI, < 2 minutes)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--ops", help=f"comma list of {', '.join(OPS)}")
    parser.add_argument("--shapes", help=f"comma list of shape sets: {', '.join(shape_sets('gpu'))}")
    parser.add_argument("--competitors", help="comma list of competitor names or prefixes, e.g. "
                        "vaekernels,torch.compile (eager always runs)")
    parser.add_argument("--json", metavar="PATH", help="results JSON (default bench/out/results-<device>.json)")
    parser.add_argument("--markdown", metavar="PATH", nargs="?", const="-", help="markdown table block (- or no "
                        "PATH: print it)")
    parser.add_argument("--plot", metavar="PATH", help="PNG of speedup vs size")
    parser.add_argument("--save", action="store_true", help="write JSON, markdown and PNG to bench/results/")
    parser.add_argument("--from-json", metavar="PATH", help="render a saved run instead of running")
    parser.add_argument("--cpu-compile", action="store_true", help="run torch.compile on the CPU too (slow: "
                        "compiles a graph per op, mode and set)")
    parser.add_argument("--readme", action="store_true", help="regenerate README's performance block for this "
                        "run's kind (CPU or GPU) from it; with --save or --from-json, whose markdown it links")
    parser.add_argument("--first-contact", action="store_true", help="only the first GPU contact's shapes, one per "
                        "op (shapes.FIRST_CONTACT; bench/gpu_check.sh first-contact)")
    parser.add_argument("--dispatch", action="store_true", help="write this GPU run's fastest fused backend per "
                        "op and size into vaekernels/dispatch.json (the table \"auto\" uses)")
    parser.add_argument("--timeout", type=float, help="seconds per comparison on the CPU (default 900, quick 120)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    if args.from_json:
        with open(args.from_json) as f:
            data = json.load(f)
    else:
        cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
        plan = Plan.make(torch.device("cuda" if cuda else "cpu"), args.quick, args.timeout, args.cpu_compile)
        ops = _names(args.ops, OPS, "ops")
        set_names = _names(args.shapes, list(shape_sets("gpu")), "shape sets")
        competitor_names = _names(args.competitors, list(BY_NAME), "competitors")
        data = benchmark(plan, ops, set_names, competitor_names, progress=not args.no_progress,
                         first_contact=args.first_contact)
    tag = device_tag(data["meta"])
    print(console_report(data))
    outputs = {}
    if not args.from_json:
        outputs["json"] = args.json or os.path.join(BENCH, "out", f"results-{tag}.json")
    if args.save:
        stem = os.path.join(BENCH, "results", f"{tag}-{data['meta']['date'][:10].replace('-', '')}")
        outputs.update(json=f"{stem}.json", markdown=f"{stem}.md", plot=f"{stem}.png")
    outputs.update({k: v for k, v in (("markdown", args.markdown), ("plot", args.plot)) if v})
    if "json" in outputs:
        _write(outputs["json"], json.dumps(data, indent=1, default=str) + "\n")
    if outputs.get("markdown") == "-":
        print("\n" + markdown_report(data))
    elif "markdown" in outputs:
        _write(outputs["markdown"], markdown_report(data))
    if "plot" in outputs:
        os.makedirs(os.path.dirname(os.path.abspath(outputs["plot"])), exist_ok=True)
        plot(data, outputs["plot"])
    if args.readme:
        tables = outputs.get("markdown") if args.save else args.from_json and args.from_json[:-5] + ".md"
        if not tables:
            raise SystemExit("--readme needs --save or --from-json (the block links the full tables)")
        update_readme(os.path.join(ROOT, "README.md"), data["meta"]["kind"],
                      headline(data, os.path.relpath(tables, ROOT)))
        outputs["readme"] = os.path.join(ROOT, "README.md")
    if args.dispatch:
        source = os.path.relpath(args.from_json or outputs["json"], ROOT)
        print("\n" + dispatch.describe(dispatch.update(data, _backend.DISPATCH_TABLE, source)))
        outputs["dispatch"] = _backend.DISPATCH_TABLE
    written = [v for v in outputs.values() if v != "-"]
    if written:
        print(f"\nwrote {', '.join(written)}")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
