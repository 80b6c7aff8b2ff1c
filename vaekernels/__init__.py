"""vaekernels: fused kernels for the latent bottleneck of VAEs and VQ-VAEs (reparameterization, Gaussian KL,
nearest-codebook search with its losses, gradients and EMA statistics), with Triton, CUDA C++ and PyTorch backends."""
from . import nn
from ._backend import available_backends, get_backend, set_backend, use_backend
from ._kmeans import kmeans
from .ops import (IBQResult, LFQResult, ResidualVQResult, VQResult, factorized_residual_quantize, gaussian_kl,
                  index_backprop_quantize, lookup_free_quantize, nearest_code, reparameterize, reparameterize_kl,
                  vector_quantize)
from .patch import patch, unpatch

__version__ = "0.1.0"

__all__ = [
    "reparameterize", "gaussian_kl", "reparameterize_kl", "nearest_code", "vector_quantize", "VQResult", "kmeans",
    "lookup_free_quantize", "LFQResult", "index_backprop_quantize", "IBQResult", "factorized_residual_quantize",
    "ResidualVQResult",
    "available_backends", "get_backend", "set_backend", "use_backend", "nn", "patch", "unpatch",
]
