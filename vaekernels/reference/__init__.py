"""The pure PyTorch backend: the fallback on every device and the oracle for tests.

Every backend module (this one, `vaekernels.triton`, `vaekernels.cuda`) implements the same five
functions with the same contract; the ops in `vaekernels.ops` validated the arguments already.

gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale) -> (z | None, kl | None)
    mu, logvar, prior_* (or None): contiguous, one shape and device. seed: 0-d int64 tensor, or None for no sample;
    on the host (eager calls) or on mu's device (drawn under torch.compile or CUDA-graph capture).
    z = mu + exp(0.5 logvar) * eps, in mu's dtype, eps drawn from the seed: the Philox stream of tl.randn(seed,
    flat index) on GPUs (Triton, CUDA, and this backend on CUDA tensors); this backend on CPU tensors draws from
    torch's CPU generator seeded with it (`reference.gaussian.noise`).
    kl_mode "none": no KL; "elementwise": KL per element in mu's dtype; "sum": kl_scale * sum, a 0-d
    accumulation-dtype tensor; "latent": kl_scale * sum over dim 0, shape (numel // shape[0],); "sample":
    kl_scale * sum over all but dim 0, shape (shape[0],).
gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, z, kl_mode, kl_scale) -> (dmu | None, dlogvar, dprior_mu, dprior_logvar)
    dz: gradient of z or None; z: the forward's sample (passed for CPU tensors, where z - mu = sigma * eps saves
    drawing eps again), or None: regenerate eps from the seed; dkl: gradient of the KL in the shape kl_mode gave it, or None; the KL's own gradient is
    multiplied by kl_scale (1.0 for "elementwise").
    dmu is None when dkl is None (the caller uses dz itself); dprior_* are None without a prior.
nearest_code(z, codebook, dim, precision) -> int64 indices, z's shape without `dim`; -1 where a distance is NaN.
vq_forward(z, codebook, dim, precision, with_sums) -> (quantized, indices, sq_err, counts, sums | None)
    quantized: z's shape and dtype, the chosen codes (NaN rows for index -1); sq_err: 0-d accumulation-dtype sum of
    (e - z)^2; counts: (K,) int64 rows per code; sums: (K, D) accumulation-dtype sum of z rows per code.
vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator) -> (dz, dcodebook | None)
    dz = T(dq) + (2 / numel) * d_commit * (z - e), T the identity ("ste") or the rotation-trick map ("rotation");
    dcodebook = scatter by code of (2 / numel) * d_codebook * (e - z) (None when d_codebook is None).
lfq_forward(x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps)
        -> (quantized, indices, avg, per_sample_entropy, commitment)
    x: contiguous, num_codebooks * K channels along dim, K <= 24; per group x~ = x (spherical: s x / ||x||), codes
    +-sigma (sigma = s, spherical s / sqrt(K)). quantized: x's shape and dtype, where(x~ > 0, sigma, -sigma);
    indices: int64, x's shape with dim replaced by a last axis of num_codebooks, bits most significant first;
    avg: (num_codebooks, 2^K) accumulation-dtype mean over tokens of p(c | x) = softmax_c(2 inv_temperature <x~, c>);
    per_sample_entropy: 0-d mean over tokens and groups of H(p) (clamped: -sum p log max(p, eps)); commitment: 0-d
    mean((x~ - quantized)^2). Streams over code tiles: never tokens x codes.
lfq_backward(dq, d_avg, d_ps, d_commit, x, dim, inv_temperature, codebook_scale, spherical, num_codebooks, clamped, eps) -> dx
    dq (straight-through to x~), d_avg (num_codebooks, 2^K), d_ps, d_commit (0-d): gradients of lfq_forward's
    outputs, each possibly None; dx: x's shape and dtype, through the spherical normalisation.
ibq_forward(z, codebook, dim, beta, temperature, entropy) -> (quantized, indices, avg | None, per_sample_entropy | None,
        quant_loss, stats, pc)
    z: D channels along dim; codebook (K, D). indices: int64, z's shape without dim, argmax_k <z, c_k> (lowest on
    ties, -1 for NaN rows); quantized: z's shape and dtype, codebook[indices] (NaN rows for -1); avg: (K,)
    accumulation-dtype mean over rows of softmax(L / temperature), L = z codebook^T; per_sample_entropy: 0-d mean
    of its entropies; quant_loss: 0-d (2 + beta) mean((quantized - z)^2); stats: (N, 4) [m = max L, logsumexp(L - m),
    logsumexp((L - m) / temperature), entropy] per row (the last two zero without entropy); pc: (N, D)
    softmax(L) codebook.
    Streams over code blocks: never rows x codes.
ibq_backward(dq, d_avg, d_ps, d_quant, z, codebook, indices, stats, pc, dim, beta, temperature) -> (dz, dcodebook)
    dq, d_avg (K,), d_ps, d_quant (0-d): gradients of ibq_forward's outputs, each possibly None; quantized's is
    IBQ's (through softmax(L) and the hard one-hot). dz: z's shape and dtype; dcodebook: the codebook's.
"""
from .gaussian import gaussian_backward, gaussian_forward
from .ibq import ibq_backward, ibq_forward
from .lfq import lfq_backward, lfq_forward
from .vq import nearest_code, vq_backward, vq_forward

OPS = frozenset({"gaussian_fwd", "gaussian_bwd", "nearest_code", "vq_fwd", "vq_bwd", "lfq_fwd", "lfq_bwd",
                 "ibq_fwd", "ibq_bwd"})  # the DISPATCH_OPS it implements

__all__ = ["gaussian_forward", "gaussian_backward", "nearest_code", "vq_forward", "vq_backward", "lfq_forward", "lfq_backward",
           "ibq_forward", "ibq_backward"]
