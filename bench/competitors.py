"""Who the benchmark measures: the eager formula, torch.compile of it, each vaekernels backend (and precision) and
the libraries people use instead (vector-quantize-pytorch, diffusers, FAISS, pykeops). Each competitor has a
builder that turns a case into (forward, leaves) on fresh inputs; comparison.make_step makes a step of them."""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Callable

import torch
from torch import nn

import vaekernels as vk
from cases import Case, Plan, Skip, codebook_input, is_image, latents, rows, vq_input
from shapes import OPS, VAE_OPS, Codes
from vaekernels import _backend, eager

# ------------------------------------------------------------------ the formulas being compared


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
                self._update(stage, rows(residual.detach(), self.dim), idx.reshape(-1))
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
            z = vq_input(case, device)
            return (lambda: _quantized_and_loss(module(z))), [z, *module.parameters()]
        fn = wrap(formulas(competitor)[case.op])
        if case.op in VAE_OPS:
            mu, logvar = latents(case, device)
            return (lambda: fn(mu, logvar)), [mu, logvar]
        z, codebook, dim = vq_input(case, device), codebook_input(case, device), case.shape.dim
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
        params = torch.cat(latents(case, device), 1).detach().requires_grad_(case.mode == "fwdbwd")

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
    z = vq_input(case, device)
    # NCHW as the module expects; row data as a (1, D, 1, N) view whose NHWC permute is contiguous
    x = z if is_image(s) else rows(z, s.dim).view(1, 1, s.n, s.d).permute(0, 3, 1, 2)
    return (lambda: list(module(x)[:2])), [z, *module.parameters()]


def _build_vqpytorch(case: Case, plan: Plan, competitor):
    """vector-quantize-pytorch: VectorQuantize with a learned codebook and the straight-through estimator for
    vector_quantize; EMA VectorQuantize / ResidualVQ for vq_module (rotation trick off, as the others)."""
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    s = case.shape
    common = dict(commitment_weight=0.25, rotation_trick=False, accept_image_fmap=is_image(s))
    if case.op == "vector_quantize":
        module = VectorQuantize(dim=s.d, codebook_size=s.codes, learnable_codebook=True, ema_update=False, **common)
    elif s.stages == 1:
        module = VectorQuantize(dim=s.d, codebook_size=s.codes, decay=0.99, **common)
    else:
        module = ResidualVQ(dim=s.d, num_quantizers=s.stages, codebook_size=s.codes, decay=0.99, **common)
    module = module.to(plan.device).train()
    z = vq_input(case, plan.device)
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
    z, codebook = vq_input(case, plan.device), codebook_input(case, plan.device)

    def forward():
        index.reset()
        index.add(codebook)
        return [index.search(rows(z, s.dim).contiguous(), 1)[1]]

    return forward, [z, codebook]


def _build_keops(case: Case, plan: Plan, competitor):
    """pykeops: argmin over j of the symbolic ||z_i - e_j||^2 (never materialised)."""
    from pykeops.torch import LazyTensor

    s = case.shape
    z, codebook = vq_input(case, plan.device), codebook_input(case, plan.device)

    def forward():
        x_i = LazyTensor(rows(z, s.dim).contiguous()[:, None, :])
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
