"""Test setup: without a GPU, Triton kernels run on CPU tensors through Triton's interpreter.

TRITON_INTERPRET (and VAEKERNELS_AUTOTUNE) must be set before any @triton.jit kernel is defined, so they are
set here, before vaekernels is imported. With a GPU the same tests run the compiled kernels on CUDA tensors.
"""
import contextlib
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# one search config instead of autotuning per shape (each tuning compiles every config); the configs are
# covered by tests/test_backends.py::test_every_search_config and, compiled, by tests/test_triton_compile.py
os.environ.setdefault("VAEKERNELS_AUTOTUNE", "0")

import vaekernels as vk  # noqa: E402
from vaekernels import _backend  # noqa: E402

DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
FUSED_BACKENDS = [b for b in ("triton", "cuda") if _backend.availability(b)[0]]
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device; the CPU runs the interpreter twin of this test")

# per-dtype tolerances (atol = rtol) for comparing a fused backend with the reference
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _restore_backend():
    before = vk.get_backend()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    vk.set_backend(before)
    torch.use_deterministic_algorithms(deterministic)


def assert_close(actual, expected, dtype=torch.float32, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.float() if dtype != torch.float64 else actual,
                               expected.float() if dtype != torch.float64 else expected,
                               atol=tol, rtol=tol, equal_nan=True)


@contextlib.contextmanager
def philox_reference():
    """Run the reference backend on the Philox stream on CPU tensors too (it samples with torch's generator there),
    so that its samples equal the fused backends' element by element."""
    from vaekernels.reference import gaussian

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gaussian, "noise", gaussian.philox_noise)
        yield
