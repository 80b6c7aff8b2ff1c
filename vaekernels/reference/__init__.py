"""The pure PyTorch backend: the fallback on every device and the oracle for tests.

Every backend module (this one, `vaekernels.triton`, `vaekernels.cuda`) implements the same five
functions with the same contract; the ops in `vaekernels.ops` validated the arguments already.

gaussian_forward(mu, logvar, prior_mu, prior_logvar, seed, kl_mode, kl_scale) -> (z | None, kl | None)
    mu, logvar, prior_* (or None): contiguous, one shape and device. seed: 0-d int64 tensor, or None for no sample.
    z = mu + exp(0.5 logvar) * randn(seed, offset = flat index), in mu's dtype.
    kl_mode "none": no KL; "elementwise": KL per element in mu's dtype; "sum": kl_scale * sum, a 0-d
    accumulation-dtype tensor; "latent": kl_scale * sum over dim 0, shape (numel // shape[0],); "sample":
    kl_scale * sum over all but dim 0, shape (shape[0],).
gaussian_backward(dz, dkl, mu, logvar, prior_mu, prior_logvar, seed, kl_mode) -> (dmu | None, dlogvar, dprior_mu, dprior_logvar)
    dz: gradient of z or None; dkl: gradient of the KL in the shape kl_mode gave it (kl_scale already applied), or None.
    dmu is None when dkl is None (the caller uses dz itself); dprior_* are None without a prior.
nearest_code(z, codebook, dim, precision) -> int64 indices, z's shape without `dim`; -1 where a distance is NaN.
vq_forward(z, codebook, dim, precision, with_sums) -> (quantized, indices, sq_err, counts, sums | None)
    quantized: z's shape and dtype, the chosen codes (NaN rows for index -1); sq_err: 0-d accumulation-dtype sum of
    (e - z)^2; counts: (K,) int64 rows per code; sums: (K, D) accumulation-dtype sum of z rows per code.
vq_backward(dq, z, codebook, indices, d_commit, d_codebook, dim, estimator) -> (dz, dcodebook | None)
    dz = T(dq) + (2 / numel) * d_commit * (z - e), T the identity ("ste") or the rotation-trick map ("rotation");
    dcodebook = scatter by code of (2 / numel) * d_codebook * (e - z) (None when d_codebook is None).
"""
from .gaussian import gaussian_backward, gaussian_forward
from .vq import nearest_code, vq_backward, vq_forward

__all__ = ["gaussian_forward", "gaussian_backward", "nearest_code", "vq_forward", "vq_backward"]
