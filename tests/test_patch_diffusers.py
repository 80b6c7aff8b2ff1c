"""vk.patch on diffusers: VectorQuantizer (VQModel) and the DiagonalGaussianDistribution posterior
(AutoencoderKL), instance and class level, plus the registry's errors and warnings."""
import sys

import numpy as np
import pytest
import torch

import vaekernels as vk
from .doubles.compare import CPU_FUSED_BACKENDS, OpCalls, assert_patched_equivalent, vq_objective, weights_like

pytest.importorskip("diffusers")
from diffusers import AutoencoderKL, VQModel  # noqa: E402
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution, VectorQuantizer  # noqa: E402

TINY = dict(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, norm_num_groups=4,
            latent_channels=4, sample_size=8)


def _tiny_vq():
    return VQModel(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                   num_vq_embeddings=16, **TINY)


def _tiny_kl():
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), **TINY)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("sane_index_shape", [True, False])
def test_vector_quantizer_equivalent(legacy, sane_index_shape):
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.25, legacy=legacy, sane_index_shape=sane_index_shape)
    assert_patched_equivalent(q, lambda: torch.randn(2, 4, 3, 5), vq_objective)


def test_vector_quantizer_remap_equivalent(tmp_path):
    np.save(tmp_path / "used.npy", np.arange(1, 16, 3))
    torch.manual_seed(0)
    q = VectorQuantizer(16, 4, beta=0.25, remap=str(tmp_path / "used.npy"), unknown_index="random")
    assert_patched_equivalent(q, lambda: torch.randn(2, 4, 3, 5), vq_objective)


def test_vqmodel_training_step_equivalent():
    torch.manual_seed(0)
    patched = assert_patched_equivalent(
        _tiny_vq(), lambda: torch.randn(2, 3, 8, 8),
        lambda out: (out.sample * weights_like(out.sample)).sum() + out.commit_loss.sum(), tol=(1e-4, 1e-4))
    assert patched.quantize._vaekernels_patched and "_vaekernels_patched" not in vars(patched)


def _posteriors(seed=0):
    torch.manual_seed(seed)
    model = _tiny_kl()
    x = torch.randn(2, 3, 8, 8)
    patched = vk.patch(_tiny_kl().requires_grad_(False))
    patched.load_state_dict(model.state_dict())
    model.requires_grad_(False)
    return model.encode(x).latent_dist, patched.encode(x).latent_dist


def test_autoencoder_kl_encode_hands_out_patched_posteriors():
    ref, post = _posteriors()
    assert post._vaekernels_patched and not hasattr(ref, "_vaekernels_patched")
    assert type(post) is DiagonalGaussianDistribution
    torch.testing.assert_close(post.mode(), ref.mode())
    sample = torch.randn_like(ref.mean)
    torch.testing.assert_close(post.nll(sample), ref.nll(sample))
    with OpCalls() as calls:
        post.kl(), post.sample()
    assert calls.names == ["vaekernels::gaussian_fwd"] * 2


def _with_grad(params):
    """A posterior over leaf `params` whose logvar half straddles the clamp at [-30, 20]."""
    params = params.clone()
    params[:, 4:, 0, 0] = torch.tensor([-40.0, 25.0, -31.0, 19.0])
    return params.requires_grad_()


@pytest.mark.parametrize("with_other", [False, True])
def test_posterior_kl_equal_values_and_gradients(with_other):
    torch.manual_seed(0)
    params, other_params = torch.randn(2, 8, 3, 3), torch.randn(2, 8, 3, 3)
    results = []
    for patch in (False, True):
        p, o = _with_grad(params), _with_grad(other_params)
        post, other = DiagonalGaussianDistribution(p), DiagonalGaussianDistribution(o)
        if patch:
            vk.patch(post)
        kl = post.kl(other) if with_other else post.kl()
        (kl * torch.tensor([1.0, -2.0])).sum().backward()
        results.append((kl, p.grad, o.grad))
    assert results[1][0].shape == (2,)
    torch.testing.assert_close(results[1], results[0])


@pytest.mark.parametrize("backend", CPU_FUSED_BACKENDS)
def test_posterior_kl_on_fused_backend(backend):
    torch.manual_seed(0)
    params = torch.randn(2, 8, 3, 3)
    ref = DiagonalGaussianDistribution(params)
    with vk.use_backend(backend):
        post = vk.patch(DiagonalGaussianDistribution(params))
        torch.testing.assert_close(post.kl(), ref.kl())
        torch.testing.assert_close(post.kl(ref), ref.kl(ref))


def test_posterior_sample_is_reproducible_and_follows_the_reparameterization():
    torch.manual_seed(0)
    p = _with_grad(torch.randn(2, 8, 3, 3))
    post = vk.patch(DiagonalGaussianDistribution(p))
    z = post.sample(generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(post.sample(generator=torch.Generator().manual_seed(7)), z, rtol=0, atol=0)
    assert not torch.equal(post.sample(generator=torch.Generator().manual_seed(8)), z)
    mean, logvar = p.detach().chunk(2, dim=1)
    clamped = logvar.clamp(-30.0, 20.0)
    # eps comes from the kernel's Philox stream seeded by the generator, as vk.reparameterize draws it
    torch.testing.assert_close(z, vk.reparameterize(mean, clamped, generator=torch.Generator().manual_seed(7)))
    g = weights_like(z)
    (z * g).sum().backward()
    eps = (z.detach() - mean) / torch.exp(0.5 * clamped)
    in_range = (logvar >= -30) & (logvar <= 20)
    torch.testing.assert_close(p.grad[:, :4], g)  # dz/dmean = 1
    torch.testing.assert_close(p.grad[:, 4:], g * 0.5 * torch.exp(0.5 * clamped) * eps * in_range)


def test_posterior_sample_distribution():
    torch.manual_seed(0)
    mean, logvar = torch.full((4, 1, 50, 50), 1.5), torch.full((4, 1, 50, 50), 2 * np.log(0.5))
    post = vk.patch(DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)))
    z = post.sample(generator=torch.Generator().manual_seed(3))
    assert abs(z.mean().item() - 1.5) < 0.02 and abs(z.std().item() - 0.5) < 0.02


def test_deterministic_posterior_is_left_as_is_with_a_warning():
    post = DiagonalGaussianDistribution(torch.randn(1, 4, 2, 2), deterministic=True)
    with pytest.warns(UserWarning, match="deterministic=True"):
        vk.patch(post)
    assert not hasattr(post, "_vaekernels_patched")


def test_class_level_patch_reaches_models_loaded_afterwards(tmp_path):
    torch.manual_seed(0)
    _tiny_vq().save_pretrained(tmp_path / "vq")
    _tiny_kl().save_pretrained(tmp_path / "kl")
    x = torch.randn(1, 3, 8, 8)
    vk.patch("diffusers")
    try:
        vq, kl = VQModel.from_pretrained(tmp_path / "vq"), AutoencoderKL.from_pretrained(tmp_path / "kl")
        assert vq.quantize._vaekernels_patched and VectorQuantizer._vaekernels_patched
        with OpCalls() as calls:
            vq(x)
            kl.encode(x).latent_dist.kl()
        assert calls.names.count("vaekernels::vq_fwd") == 1 and calls.names.count("vaekernels::gaussian_fwd") == 1
    finally:
        vk.unpatch("diffusers")
    with OpCalls() as calls:
        VQModel.from_pretrained(tmp_path / "vq")(x)
        AutoencoderKL.from_pretrained(tmp_path / "kl").encode(x).latent_dist.kl()
    assert calls.names == []
    assert "_vaekernels_patched" not in vars(VectorQuantizer)


def test_unpatch_model_restores_originals():
    model = vk.patch(_tiny_kl())
    assert "encode" in vars(model)
    vk.unpatch(model)
    assert "encode" not in vars(model) and not hasattr(model, "_vaekernels_patched")
    with OpCalls() as calls:
        model.encode(torch.randn(1, 3, 8, 8)).latent_dist.kl()
    assert calls.names == []


def test_patched_forward_keeps_its_signature():
    import inspect

    q = vk.patch(VectorQuantizer(8, 4, beta=0.25))
    assert inspect.signature(q.forward) == inspect.signature(VectorQuantizer(8, 4, beta=0.25).forward)


def test_unrecognised_module_warns():
    with pytest.warns(UserWarning, match="found no known quantizer or posterior in Linear"):
        assert isinstance(vk.patch(torch.nn.Linear(2, 2)), torch.nn.Linear)


def test_unknown_library_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="audiocraft, dac, diffusers, encodec, snac, speechtokenizer, taming, "
                                         "vector_quantize_pytorch, vqvae2"):
        vk.patch("keras")


def test_missing_library_names_the_pip_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers.models.autoencoders.vae", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        vk.patch("diffusers")
