"""Backend selection, availability reporting and the command line."""
import subprocess
import sys

import pytest
import torch

import vaekernels as vk
from vaekernels import _backend

from .conftest import HAS_CUDA


def test_backend_choice_and_context_manager():
    assert "torch" in vk.available_backends()
    vk.set_backend("torch")
    with vk.use_backend("auto"):
        assert vk.get_backend() == "auto"
    assert vk.get_backend() == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.set_backend("numpy")


def test_auto_runs_the_reference_on_cpu_tensors():
    assert _backend.resolve_name("vq_fwd", torch.device("cpu")) == "torch"


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour of a machine without a CUDA device")
def test_cuda_backend_reports_why_it_is_unavailable():
    ok, why = _backend.availability("cuda")
    assert not ok and ("CUDA device" in why or "not built" in why)
    with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
        vk.set_backend("cuda")
    vk.set_backend("auto")
    assert vk.nearest_code(torch.randn(3, 2), torch.randn(4, 2)).shape == (3,)


def test_fused_backend_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    if not _backend.availability("triton")[0]:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "_default", "triton")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors"):
        _backend.implementation("vq_fwd", torch.device("cpu"))


def test_info_command_lists_every_backend():
    out = subprocess.run([sys.executable, "-m", "vaekernels", "info"], capture_output=True, text=True, check=True)
    for name in ("torch", "triton", "cuda", "vaekernels", "CUDA extension", "auto on CUDA tensors"):
        assert name in out.stdout
    bad = subprocess.run([sys.executable, "-m", "vaekernels", "frobnicate"], capture_output=True, text=True)
    assert bad.returncode == 2 and "usage" in bad.stdout


def test_use_backend_is_thread_local():
    """A use_backend block changes the choice of its own thread only; set_backend is the process default."""
    import threading

    inside, release = threading.Event(), threading.Event()
    seen = {}

    def worker():
        with vk.use_backend("torch"):
            seen["worker"] = vk.get_backend()
            inside.set()
            release.wait(10)
        seen["worker after"] = vk.get_backend()

    vk.set_backend("auto")
    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(10)
    seen["main"] = vk.get_backend()
    with vk.use_backend("torch"):
        vk.set_backend("auto")  # changes the default; this block's choice still wins here
        seen["main block"] = vk.get_backend()
    release.set()
    thread.join(10)
    assert seen == {"worker": "torch", "main": "auto", "main block": "torch", "worker after": "auto"}
    with pytest.raises(ValueError, match="backend must be one of"):
        with vk.use_backend("fastest"):
            pass
