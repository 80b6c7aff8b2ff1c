"""vk.patch on the quantizers that live in repositories: taming's VectorQuantizer2, rosinality's Quantize,
zalando's VectorQuantizerEMA (test doubles written from their published code)."""
import sys

import numpy as np
import pytest
import torch
from torch import nn

import vaekernels as vk
from .doubles import taming, vqvae2, zalando
from .doubles.compare import CPU_FUSED_BACKENDS, OpCalls, assert_patched_equivalent, vq_objective, weights_like


def _nchw():
    return torch.randn(2, 4, 3, 5)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [True, False])
def test_taming_vectorquantizer2_equivalent(legacy, sane_index_shape):
    torch.manual_seed(0)
    q = taming.VectorQuantizer2(16, 4, beta=0.25, legacy=legacy, sane_index_shape=sane_index_shape)
    assert_patched_equivalent(q, _nchw, vq_objective)


@pytest.mark.parametrize("unknown_index", ["random", "extra", 0])
def test_taming_remap_equivalent(tmp_path, unknown_index):
    path = tmp_path / "used.npy"
    np.save(path, np.arange(0, 16, 2))  # half the codes are "used": the others go to unknown_index
    torch.manual_seed(0)
    q = taming.VectorQuantizer2(16, 4, beta=0.25, remap=str(path), unknown_index=unknown_index)
    patched = assert_patched_equivalent(q, _nchw, vq_objective)
    assert patched(_nchw())[2][2].shape == (2 * 3 * 5, 1)


def test_rosinality_quantize_equivalent():
    torch.manual_seed(0)
    q = vqvae2.Quantize(4, 16, decay=0.9)
    patched = assert_patched_equivalent(
        q, lambda: torch.randn(2, 3, 5, 4), lambda out: (out[0] * weights_like(out[0])).sum() + out[1])
    assert not torch.equal(patched.embed, vqvae2.Quantize(4, 16).embed)  # the EMA step moved the codebook


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_equivalent_on_fused_backend(backend):
    torch.manual_seed(0)
    with vk.use_backend(backend):
        assert_patched_equivalent(vqvae2.Quantize(4, 16), lambda: torch.randn(2, 3, 5, 4),
                                  lambda out: (out[0] * weights_like(out[0])).sum() + out[1])
        assert_patched_equivalent(taming.VectorQuantizer2(16, 4, beta=0.25), _nchw, vq_objective)


def test_rosinality_quantize_in_a_model_with_permuted_input():
    torch.manual_seed(0)

    class Model(nn.Module):  # as VQVAE.encode feeds it: conv output permuted to channel-last
        def __init__(self):
            super().__init__()
            self.conv, self.quantize_t = nn.Conv2d(3, 4, 1), vqvae2.Quantize(4, 16)

        def forward(self, x):
            quant, diff, ids = self.quantize_t(self.conv(x).permute(0, 2, 3, 1))
            return quant.permute(0, 3, 1, 2), diff, ids

    assert_patched_equivalent(Model(), lambda: torch.randn(2, 3, 4, 4), vq_objective)


def test_zalando_vectorquantizer_ema_equivalent():
    torch.manual_seed(0)
    q = zalando.VectorQuantizerEMA(16, 4, commitment_cost=0.25, decay=0.9)
    patched = assert_patched_equivalent(
        q, _nchw, lambda out: (out[1] * weights_like(out[1])).sum() + out[0])
    loss, quantized, perplexity, encodings = patched(_nchw())
    assert encodings.shape == (2 * 3 * 5, 16) and perplexity.dim() == 0
    assert isinstance(patched._ema_w, nn.Parameter) and isinstance(patched._embedding.weight, nn.Parameter)


def test_unpatch_restores_the_original_forward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), zalando.VectorQuantizerEMA(8, 4, 0.25, 0.99))
    assert vk.patch(model) is model and model[1]._vaekernels_patched
    with OpCalls() as calls:
        model[1](torch.randn(1, 4, 2, 2))
    assert calls.names
    assert vk.unpatch(model) is model
    assert "forward" not in vars(model[1]) and not hasattr(model[1], "_vaekernels_patched")
    with OpCalls() as calls:
        model[1](torch.randn(1, 4, 2, 2))
    assert calls.names == []


def test_patch_a_class_affects_instances_built_afterwards():
    vk.patch(vqvae2.Quantize)
    try:
        q = vqvae2.Quantize(4, 8)
        assert q._vaekernels_patched
        with OpCalls() as calls:
            q(torch.randn(3, 4))
        assert "vaekernels::vq_fwd" in calls.names
    finally:
        vk.unpatch(vqvae2.Quantize)
    assert not hasattr(vqvae2.Quantize, "_vaekernels_patched")
    with OpCalls() as calls:
        vqvae2.Quantize(4, 8)(torch.randn(3, 4))
    assert calls.names == []


def test_patch_by_library_name_finds_the_repo_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "taming.modules.vqvae.quantize", taming)
    monkeypatch.setitem(sys.modules, "vqvae", vqvae2)
    cases = (("taming", lambda: taming.VectorQuantizer2(8, 4, 0.25), (1, 4, 2, 2)),
             ("vqvae2", lambda: vqvae2.Quantize(4, 8), (3, 4)))
    for name, make, shape in cases:
        vk.patch(name)
        try:
            with OpCalls() as calls:
                make()(torch.randn(shape))
            assert "vaekernels::vq_fwd" in calls.names
        finally:
            vk.unpatch(name)


def test_library_not_installed_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "taming", None)
    with pytest.raises(ImportError, match="pip install taming-transformers"):
        vk.patch("taming")
    monkeypatch.setitem(sys.modules, "vqvae", None)
    with pytest.raises(ImportError, match="rosinality/vq-vae-2-pytorch"):
        vk.patch("vqvae2")


def test_a_subclass_that_overrides_forward_is_not_patched():
    class Custom(vqvae2.Quantize):
        def forward(self, input):
            return super().forward(input * 2)

    with pytest.warns(UserWarning, match="found no known quantizer"):
        vk.patch(Custom(4, 8))
