"""nn.Modules over the ops: VectorQuantizer (learned or EMA codebook, dead-code restarts, DDP sync),
ResidualVectorQuantizer, IndexBackpropQuantizer (IBQ) and DiagonalGaussian (the posterior of a VAE encoder)."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _checks
from ._kmeans import lloyd
from .ops.gaussian import gaussian_kl, reparameterize_kl
from .ops.ibq import index_backprop_quantize
from .ops.vq import VQResult, quantize_with_stats
from .reference.vq import rows


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


class VectorQuantizer(nn.Module):
    """A VQ-VAE bottleneck: nearest code, straight-through (or rotation-trick) gradient, both losses.

    ema=False: `codebook` is a Parameter trained by the codebook loss. ema=True (Sonnet's VectorQuantizerEMA):
    `codebook` is a buffer updated in training from per-code counts and sums (all-reduced under
    torch.distributed), with Laplace smoothing `eps`. `code_usage` counts rows per code since the last
    restart or `reset_usage()`; `restart_dead_codes` re-seeds rarely used codes from the latest batch.
    kmeans_init=True: the first training forward first sets the codebook to `vk.kmeans` (kmeans_iters iterations)
    of the rows its search sees; the `initted` buffer (in the state_dict) records that it has run. That first
    step runs eagerly: under torch.compile(fullgraph=True), run it before compiling (or restore a checkpoint).
    """

    def __init__(self, num_codes: int, code_dim: int, *, beta: float = 0.25, ema: bool = False, decay: float = 0.99,
                 eps: float = 1e-5, distance: str = "l2", dim: int = -1, estimator: str = "ste",
                 precision: str = "exact", kmeans_init: bool = False, kmeans_iters: int = 10):
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise ValueError(f"num_codes and code_dim must be >= 1, got {num_codes} and {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        _checks.choice("distance", distance, _checks.DISTANCES)
        _checks.choice("estimator", estimator, _checks.ESTIMATORS)
        _checks.choice("precision", precision, _checks.PRECISIONS)
        self.num_codes, self.code_dim, self.dim = num_codes, code_dim, dim
        self.beta, self.ema, self.decay, self.eps = _checks.non_negative("beta", beta), ema, decay, eps
        self.distance, self.estimator, self.precision = distance, estimator, precision
        self.kmeans_init, self.kmeans_iters = bool(kmeans_init), _checks.integer("kmeans_iters", kmeans_iters)
        if ema:
            self.register_buffer("codebook", torch.randn(num_codes, code_dim))
            self.register_buffer("cluster_size", torch.zeros(num_codes))
            self.register_buffer("embed_sum", self.codebook.clone())
        else:
            self.codebook = nn.Parameter(torch.empty(num_codes, code_dim).uniform_(-1 / num_codes, 1 / num_codes))
        self.register_buffer("code_usage", torch.zeros(num_codes), persistent=False)
        # whether the codebook holds its initial value (k-means done, or not asked for); saved, so that a restored
        # module does not run k-means again
        self.register_buffer("initted", torch.tensor(not self.kmeans_init))
        self._kmeans_pending = self.kmeans_init  # read `initted` (a host sync) only until the first training forward
        self._last_batch: Tensor | None = None

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, beta={self.beta}, ema={self.ema}, "
                f"distance={self.distance!r}, dim={self.dim}, estimator={self.estimator!r}"
                + (f", kmeans_init=True, kmeans_iters={self.kmeans_iters}" if self.kmeans_init else ""))

    def forward(self, z: Tensor) -> VQResult:
        if self._kmeans_pending and self.training:
            self._kmeans_init_once(z)
        update = self.training and self.ema
        # the EMA update rewrites the codebook in place, so the op gets a snapshot it can save for backward
        codebook = self.codebook.clone() if update else self.codebook
        result, counts, sums, searched = quantize_with_stats(
            z, codebook, beta=self.beta, distance=self.distance, dim=self.dim, precision=self.precision,
            estimator=self.estimator, with_sums=update)
        if self.training:
            self._observe(counts, sums if update else None)
            if not torch.compiler.is_compiling():
                self._last_batch = searched.detach()  # rows are gathered only if restart_dead_codes runs
        return result

    # reads a flag from the device and runs Lloyd's loop, eagerly (under torch.compile: a graph break)
    @torch.compiler.disable(reason="kmeans_init runs eagerly on the first training batch: run one training "
                                   "forward before torch.compile(fullgraph=True), or restore a checkpoint")
    def _kmeans_init_once(self, z: Tensor) -> None:
        if not bool(self.initted):
            self._init_by_kmeans(z)
        self._kmeans_pending = False

    @torch.no_grad()
    def _init_by_kmeans(self, z: Tensor) -> None:
        """Codebook := k-means of the rows this batch's search sees (SoundStream's initialisation); EMA statistics
        as if the codebook had been averaged from the last assignment: cluster_size = counts, embed_sum =
        codebook * counts. Under torch.distributed every rank gets the k-means of all ranks' rows."""
        centres, counts = lloyd(z, self.num_codes, iters=self.kmeans_iters, distance=self.distance, dim=self.dim)
        self.codebook.data.copy_(centres)
        if self.ema:
            self.cluster_size.copy_(counts)
            self.embed_sum.copy_(self.codebook * self.cluster_size.unsqueeze(1))
        self.initted.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints written before `initted` existed: a saved codebook counts as initialised
        key = prefix + "initted"
        if key not in state_dict and prefix + "codebook" in state_dict:
            state_dict[key] = torch.tensor(True)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._kmeans_pending = self.kmeans_init

    @torch.no_grad()
    def _observe(self, counts: Tensor, sums: Tensor | None) -> None:
        """Account one training batch: usage counts, and the EMA codebook update when `sums` is given."""
        counts = counts.to(self.code_usage.dtype)
        if _distributed():
            dist.all_reduce(counts)
            if sums is not None:
                dist.all_reduce(sums)
        self.code_usage.add_(counts)
        if sums is None:
            return
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums.to(self.embed_sum.dtype), alpha=1 - self.decay)
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(1))

    def reset_usage(self) -> None:
        self.code_usage.zero_()

    @torch.no_grad()
    def restart_dead_codes(self, threshold: float = 1.0, z: Tensor | None = None) -> int:
        """Replace codes used fewer than `threshold` times since the last reset by random rows of `z`
        (default: the latest training batch), then start a new usage window. Returns how many were replaced.
        Under torch.distributed rank 0 chooses and broadcasts, so every rank keeps the same codebook."""
        batch = z.detach() if z is not None else self._last_batch
        if batch is None or batch.numel() == 0:
            raise ValueError("restart_dead_codes needs a batch: pass z, or run a training forward first")
        source = rows(batch, self.dim % batch.dim())
        dead = (self.code_usage < threshold).nonzero().squeeze(1)
        if dead.numel():
            new = source[torch.randint(0, source.shape[0], (dead.numel(),), device=source.device)]
            new = new.to(self.codebook.dtype)
            if _distributed():
                dist.broadcast(new, src=0)
            self.codebook.data[dead] = new
            if self.ema:
                self.embed_sum[dead] = new
                self.cluster_size[dead] = 1.0
        self.reset_usage()
        return int(dead.numel())


class ResidualVectorQuantizer(nn.Module):
    """Residual VQ (SoundStream, EnCodec): each stage quantizes what the previous stages left.

    Returns a VQResult whose indices gain a last axis (one per stage), whose losses are summed over stages,
    and whose perplexity holds one value per stage.
    """

    def __init__(self, num_quantizers: int, num_codes: int, code_dim: int, **kwargs):
        super().__init__()
        if num_quantizers < 1:
            raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
        self.layers = nn.ModuleList(VectorQuantizer(num_codes, code_dim, **kwargs) for _ in range(num_quantizers))

    def forward(self, z: Tensor) -> VQResult:
        residual, quantized, results = z, torch.zeros_like(z), []
        for layer in self.layers:
            r = layer(residual)
            residual = residual - r.quantized.detach()
            quantized = quantized + r.quantized
            results.append(r)
        return VQResult(
            quantized,
            torch.stack([r.indices for r in results], dim=-1),
            sum(r.loss for r in results),
            sum(r.codebook_loss for r in results),
            sum(r.commitment_loss for r in results),
            torch.stack([r.perplexity for r in results]),
        )


class IBQOutput(NamedTuple):
    """What IndexBackpropQuantizer returns: loss = quant_loss + entropy_weight * entropy_loss; the entropy fields
    are None without the entropy loss; perplexity: exp of the entropy of this batch's code frequencies."""
    quantized: Tensor
    indices: Tensor
    loss: Tensor
    quant_loss: Tensor
    per_sample_entropy: Optional[Tensor]
    codebook_entropy: Optional[Tensor]
    entropy_loss: Optional[Tensor]
    perplexity: Tensor


class IndexBackpropQuantizer(nn.Module):
    """An IBQ bottleneck (Shi et al. 2024): the code of maximum inner product, with a gradient to every code through
    the softmax of the logits, so that very large codebooks (2^18 codes) all train; see
    `vk.index_backprop_quantize`. The codebook is a Parameter initialised N(0, 1), as SEED-Voken's nn.Embedding.
    entropy_weight = 0 turns the entropy loss off (it is then not computed). `code_usage` counts rows per code in
    training since the last `reset_usage()` (all-reduced under torch.distributed); `distributed=True` also averages
    the entropy's code distribution over ranks."""

    def __init__(self, num_codes: int, code_dim: int, *, dim: int = 1, beta: float = 0.25,
                 entropy_weight: float = 1.0, entropy_temperature: float = 0.01, sample_entropy_weight: float = 1.0,
                 codebook_entropy_weight: float = 1.0, eps: float = 1e-5, distributed: bool = False):
        super().__init__()
        _checks.integer("num_codes", num_codes, minimum=1)
        _checks.integer("code_dim", code_dim, minimum=1)
        self.num_codes, self.code_dim, self.dim = num_codes, code_dim, dim
        self.beta = _checks.non_negative("beta", beta)
        self.entropy_weight = _checks.non_negative("entropy_weight", entropy_weight)
        self.entropy_temperature = _checks.number("entropy_temperature", entropy_temperature, positive=True)
        self.sample_entropy_weight = _checks.number("sample_entropy_weight", sample_entropy_weight)
        self.codebook_entropy_weight = _checks.number("codebook_entropy_weight", codebook_entropy_weight)
        self.eps = _checks.number("eps", eps, positive=True)
        self.distributed = _checks.boolean("distributed", distributed)
        self.codebook = nn.Parameter(torch.randn(num_codes, code_dim))
        self.register_buffer("code_usage", torch.zeros(num_codes), persistent=False)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, code_dim={self.code_dim}, dim={self.dim}, beta={self.beta}, "
                f"entropy_weight={self.entropy_weight}, entropy_temperature={self.entropy_temperature}")

    def forward(self, z: Tensor) -> IBQOutput:
        entropy = self.entropy_weight > 0
        r = index_backprop_quantize(z, self.codebook, dim=self.dim, beta=self.beta,
                                    entropy_temperature=self.entropy_temperature,
                                    sample_entropy_weight=self.sample_entropy_weight,
                                    codebook_entropy_weight=self.codebook_entropy_weight, eps=self.eps,
                                    entropy=entropy, distributed=self.distributed)
        flat = r.indices.reshape(-1)
        counts = torch.zeros(self.num_codes + 1, dtype=r.quant_loss.dtype, device=flat.device)
        counts = counts.index_put_((flat.remainder(self.num_codes + 1),), torch.ones_like(flat, dtype=counts.dtype),
                                   accumulate=True)[:-1]  # -1 (NaN rows) lands in the dropped last slot
        perplexity = torch.special.entr(counts / counts.sum().clamp_min(1)).sum().exp()
        if self.training:
            with torch.no_grad():
                if _distributed():
                    dist.all_reduce(counts)
                self.code_usage.add_(counts.to(self.code_usage.dtype))
        loss = r.quant_loss + self.entropy_weight * r.entropy_loss if entropy else r.quant_loss
        return IBQOutput(r.quantized, r.indices, loss, r.quant_loss, r.per_sample_entropy, r.codebook_entropy,
                         r.entropy_loss, perplexity)

    def reset_usage(self) -> None:
        self.code_usage.zero_()


class DiagonalGaussian(nn.Module):
    """Encoder output with 2C channels along `dim` -> (z, kl), as diffusers' DiagonalGaussianDistribution.

    Splits into mean and log-variance (clamped to `logvar_range`, as diffusers does), samples with the fused
    reparameterization+KL op in training (or when sample=True) and returns the mean otherwise.
    """

    def __init__(self, dim: int = 1, *, reduction: str = "batchmean", free_bits: float = 0.0,
                 logvar_range: tuple[float, float] = (-30.0, 20.0)):
        super().__init__()
        _checks.choice("reduction", reduction, _checks.REDUCTIONS)
        _checks.free_bits(free_bits, reduction)
        self.dim, self.reduction, self.free_bits, self.logvar_range = dim, reduction, free_bits, logvar_range

    def forward(self, params: Tensor, sample: bool | None = None) -> tuple[Tensor, Tensor]:
        _checks.float_tensor("params", params)
        dim = _checks.channel_dim(self.dim, params.dim())
        if params.shape[dim] % 2:
            raise ValueError(f"params must have an even number of channels along dim={dim}, got {params.shape[dim]}")
        mu, logvar = params.chunk(2, dim=dim)
        logvar = logvar.clamp(*self.logvar_range)
        if self.training if sample is None else sample:
            return reparameterize_kl(mu, logvar, reduction=self.reduction, free_bits=self.free_bits)
        return mu, gaussian_kl(mu, logvar, reduction=self.reduction, free_bits=self.free_bits)
