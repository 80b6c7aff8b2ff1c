"""vk.patch on vector-quantize-pytorch's VectorQuantize and ResidualVQ, and the rotation-trick estimator
against the library's own rotate_to."""
import copy

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


KMEANS_CONFIGS = {
    "defaults": dict(),
    "fewer_rows_than_codes": dict(codebook_size=80),
    "cosine": dict(use_cosine_sim=True),
    "learnable": dict(learnable_codebook=True, ema_update=False),
    "heads_separate": dict(heads=2, separate_codebook_per_head=True),
    "heads_shared": dict(heads=2),
    "image_fmap_projection": dict(accept_image_fmap=True, codebook_dim=3),
    "dead_codes": dict(threshold_ema_dead_code=2),
}


def _kmeans_vq(name, **extra):
    config = {"codebook_size": 8, "kmeans_init": True, "kmeans_iters": 4, **KMEANS_CONFIGS[name], **extra}
    make_input = _input(config) if config.get("accept_image_fmap") else lambda: torch.randn(3, 20, 4)
    torch.manual_seed(0)
    return vqp.VectorQuantize(dim=4, **config), make_input


@pytest.mark.parametrize("name", KMEANS_CONFIGS)
def test_kmeans_init_gives_the_librarys_buffers(name):
    """From the same random state, the first call (eval: the library initialises in any mode, then nothing else
    changes the buffers) gives the library's embed, embed_avg and cluster_size, through the fused search."""
    vq, make_input = _kmeans_vq(name)
    vq.eval()
    patched = vk.patch(copy.deepcopy(vq))
    torch.manual_seed(1)
    want = vq(make_input())
    want_rng = torch.get_rng_state()
    torch.manual_seed(1)
    with OpCalls() as calls:
        got = patched(make_input())
    assert torch.equal(torch.get_rng_state(), want_rng)  # the same draws: the library's initial sample
    assert calls.names.count("vaekernels::vq_fwd") == 4 * vq._codebook.num_codebooks  # k-means on the fused search
    assert bool(patched._codebook.initted)
    for buffer in ("embed", "embed_avg", "cluster_size"):
        torch.testing.assert_close(getattr(patched._codebook, buffer), getattr(vq._codebook, buffer))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", KMEANS_CONFIGS)
def test_kmeans_init_training_step_equivalent(name):
    vq, make_input = _kmeans_vq(name)
    assert_patched_equivalent(vq, make_input, _objective)


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_kmeans_init_equivalent_on_fused_backend(backend):
    vq, _ = _kmeans_vq("defaults", kmeans_iters=2)
    with vk.use_backend(backend):
        assert_patched_equivalent(vq, lambda: torch.randn(2, 6, 4), _objective)


def test_residual_vq_kmeans_init_level_by_level():
    # k-means leaves singleton clusters whose code is the row itself, so deeper residuals can be ~0, where the
    # rotation trick's |e|/|z| turns float rounding of the codes into large gradient differences: STE here
    torch.manual_seed(0)
    rvq = vqp.ResidualVQ(dim=4, num_quantizers=3, codebook_size=8, kmeans_init=True, kmeans_iters=4,
                         rotation_trick=False)
    patched = assert_patched_equivalent(rvq, lambda: torch.randn(3, 20, 4), _objective)
    assert all(bool(layer._codebook.initted) for layer in patched.layers)


@pytest.mark.parametrize("option, kwargs", [
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


def test_class_level_patch_runs_kmeans_init_on_the_fused_search():
    import warnings

    from vaekernels.patch import _base

    _base._warned.clear()  # warnings are once per process: a fallback must warn here again
    vk.patch("vector_quantize_pytorch")
    try:
        vq = vqp.VectorQuantize(dim=4, codebook_size=4, kmeans_init=True, kmeans_iters=2)
        with OpCalls() as calls, warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # covered: no fallback warning
            vq(torch.randn(2, 8, 4))
        assert calls.names.count("vaekernels::vq_fwd") == 3 and bool(vq._codebook.initted)  # 2 k-means, 1 step
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
