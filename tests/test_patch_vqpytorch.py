"""vk.patch on vector-quantize-pytorch's VectorQuantize and ResidualVQ, and the rotation-trick estimator
against the library's own rotate_to."""
import pytest
import torch

import vaekernels as vk
from .doubles.compare import CPU_FUSED_BACKENDS, OpCalls, assert_patched_equivalent, weights_like

vqp = pytest.importorskip("vector_quantize_pytorch")
from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to  # noqa: E402

CONFIGS = {
    "defaults": dict(),
    "ste": dict(rotation_trick=False),
    "cosine": dict(use_cosine_sim=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "learnable_rotation_dead_codes": dict(learnable_codebook=True, ema_update=False, threshold_ema_dead_code=2),
    "commitment_weight": dict(commitment_weight=0.3, decay=0.9),
    "channel_first": dict(channel_last=False),
    "image_fmap": dict(accept_image_fmap=True),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True),
    "heads_shared": dict(heads=2),
    "projection": dict(codebook_dim=3),
    "dead_codes": dict(threshold_ema_dead_code=2),
    "manual_ema": dict(manual_ema_update=True),
}


def _input(config):
    if config.get("accept_image_fmap"):
        return lambda: torch.randn(2, 4, 3, 3)
    if config.get("channel_last") is False:
        return lambda: torch.randn(2, 4, 5)
    return lambda: torch.randn(2, 5, 4)


def _objective(out):
    quantize, _, loss = out[:3]
    return (quantize * weights_like(quantize)).sum() + loss.sum()  # ResidualVQ: one loss per quantizer


@pytest.mark.parametrize("name", CONFIGS)
def test_vector_quantize_equivalent(name):
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, **CONFIGS[name])
    assert_patched_equivalent(vq, _input(CONFIGS[name]), _objective)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
@pytest.mark.parametrize("name", ["defaults", "heads_separate"])
def test_vector_quantize_equivalent_on_fused_backend(backend, name):
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, **CONFIGS[name])
    with vk.use_backend(backend):
        assert_patched_equivalent(vq, _input(CONFIGS[name]), _objective)


def test_defaults_use_the_rotation_trick_and_ema():
    vq = vqp.VectorQuantize(dim=4, codebook_size=8)
    assert vq.rotation_trick and vq.ema_update and vq.commitment_weight == 1.0


@pytest.mark.parametrize("name, call_kwargs", [
    ("defaults", dict(return_loss_breakdown=True)),
    ("defaults", dict(freeze_codebook=True)),
    ("defaults", dict(ema_update=False)),
    ("learnable", dict(freeze_codebook=True)),
])
def test_call_options_equivalent(name, call_kwargs):
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, **CONFIGS[name])
    assert_patched_equivalent(vq, _input({}), _objective, call_kwargs=call_kwargs)


def test_single_token_and_input_without_grad():
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, learnable_codebook=True, ema_update=False)
    assert_patched_equivalent(vq, lambda: torch.randn(3, 4), _objective)
    patched = vk.patch(vq)
    q, _, loss = patched(torch.randn(3, 4))  # input without grad: raw codes, gradient only to the codebook
    (q.sum() + loss).backward()
    assert patched._codebook.embed.grad is not None


@pytest.mark.parametrize("config", [dict(), dict(shared_codebook=True), dict(quantize_dropout=True)])
def test_residual_vq_equivalent(config):
    torch.manual_seed(0)
    rvq = vqp.ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, **config)
    patched = assert_patched_equivalent(rvq, lambda: torch.randn(2, 5, 4), _objective)
    assert all(layer._vaekernels_patched for layer in patched.layers)


@pytest.mark.parametrize("option, kwargs", [
    ("kmeans_init", dict(kmeans_init=True)),
    ("stochastic_sample_codes", dict(stochastic_sample_codes=True)),
    ("directional_reparam", dict(directional_reparam=True, threshold_ema_dead_code=1)),
    ("orthogonal_reg_weight", dict(orthogonal_reg_weight=0.1)),
    ("affine_param", dict(affine_param=True)),
])
def test_uncovered_configuration_is_left_as_is_with_a_warning(option, kwargs):
    vq = vqp.VectorQuantize(dim=4, codebook_size=8, **kwargs)
    with pytest.warns(UserWarning, match=option):
        vk.patch(vq)
    assert not hasattr(vq, "_vaekernels_patched") and "forward" not in vars(vq)


def test_uncovered_call_option_falls_back_with_a_warning():
    from vaekernels.patch import _base

    _base._warned.clear()
    torch.manual_seed(0)
    vq = vqp.VectorQuantize(dim=4, codebook_size=8).eval()
    patched = vk.patch(vqp.VectorQuantize(dim=4, codebook_size=8).eval())
    patched.load_state_dict(vq.state_dict())
    x, mask = torch.randn(2, 5, 4), torch.tensor([[True] * 5, [True, True, False, False, False]])
    with pytest.warns(UserWarning, match="with mask is not covered"):
        got = patched(x, mask=mask)
    torch.testing.assert_close(got, vq(x, mask=mask))


def test_class_level_patch_and_kmeans_init_after_its_first_step():
    from vaekernels.patch import _base

    _base._warned.clear()
    vk.patch("vector_quantize_pytorch")
    try:
        vq = vqp.VectorQuantize(dim=4, codebook_size=4, kmeans_init=True, kmeans_iters=2)
        with OpCalls() as calls, pytest.warns(UserWarning, match="kmeans_init"):
            vq(torch.randn(2, 8, 4))  # original forward: runs k-means
        assert calls.names == [] and bool(vq._codebook.initted)
        with OpCalls() as calls:
            vq(torch.randn(2, 8, 4))
        assert "vaekernels::vq_fwd" in calls.names
    finally:
        vk.unpatch("vector_quantize_pytorch")
    with OpCalls() as calls:
        vqp.VectorQuantize(dim=4, codebook_size=4)(torch.randn(2, 8, 4))
    assert calls.names == []


def test_rotation_estimator_matches_rotate_to_in_float64():
    torch.manual_seed(0)
    z = torch.randn(6, 5, dtype=torch.float64)
    z[2] = 0.0  # zero-norm row: every safe division clamps
    codebook = torch.randn(7, 5, dtype=torch.float64)
    g = torch.randn(6, 5, dtype=torch.float64)
    z1 = z.clone().requires_grad_()
    r = vk.vector_quantize(z1, codebook, estimator="rotation")
    (r.quantized * g).sum().backward()
    z2 = z.clone().requires_grad_()
    (rotate_to(z2, codebook[r.indices]) * g).sum().backward()
    assert z1.grad[2].abs().max() > 1e5  # the zero row gets the library's clamped (huge) gradient too
    torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-12, atol=1e-12)
    nonzero = torch.arange(6) != 2
    torch.testing.assert_close(r.quantized[nonzero], codebook[r.indices][nonzero], rtol=0, atol=0)
