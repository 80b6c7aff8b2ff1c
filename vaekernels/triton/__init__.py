"""The Triton backend: fused kernels for every op (see vaekernels.reference for the shared contract).

float64 inputs are delegated to the reference backend (tensor cores and fast transcendentals are float32).
"""
from .. import reference
from .gaussian import gaussian_backward, gaussian_forward
from .ibq import ibq_backward, ibq_forward
from .lfq import lfq_backward, lfq_forward
from .vq import nearest_code, vq_backward, vq_forward

OPS = reference.OPS  # the DISPATCH_OPS it implements: all of them

__all__ = ["gaussian_forward", "gaussian_backward", "nearest_code", "vq_forward", "vq_backward", "lfq_forward",
           "lfq_backward", "ibq_forward", "ibq_backward"]
