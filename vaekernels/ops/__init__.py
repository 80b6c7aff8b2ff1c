"""The torch.library ops and their public entry points (one file per op family)."""
from .gaussian import gaussian_kl, reparameterize, reparameterize_kl
from .ibq import IBQResult, index_backprop_quantize
from .lfq import LFQResult, lookup_free_quantize
from .rvq import ResidualVQResult, factorized_residual_quantize
from .vq import VQResult, nearest_code, quantize_with_stats, vector_quantize

__all__ = ["reparameterize", "gaussian_kl", "reparameterize_kl", "nearest_code", "vector_quantize",
           "quantize_with_stats", "VQResult", "lookup_free_quantize", "LFQResult",
           "index_backprop_quantize", "IBQResult", "factorized_residual_quantize", "ResidualVQResult"]
