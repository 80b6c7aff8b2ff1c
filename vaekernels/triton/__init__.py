"""The Triton backend: fused kernels for every op (see vaekernels.reference for the shared contract).

float64 inputs are delegated to the reference backend (tensor cores and fast transcendentals are float32).
"""
from .. import reference
from .gaussian import gaussian_backward, gaussian_forward
from .vq import nearest_code, vq_backward, vq_forward

# the DISPATCH_OPS it implements: the reference backend's but LFQ (no Triton kernel yet: "auto" runs the
# reference, whose LFQ is GEMMs of per-bit factor tables, on GPUs too)
OPS = reference.OPS - {"lfq_fwd", "lfq_bwd"}

__all__ = ["gaussian_forward", "gaussian_backward", "nearest_code", "vq_forward", "vq_backward"]
