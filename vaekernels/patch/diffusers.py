"""diffusers: the VectorQuantizer of VQModel, and the DiagonalGaussianDistribution posterior that AutoencoderKL
(and every diffusers autoencoder built on it) returns from encode().

The posterior's sample() draws eps in the kernel (Philox, seeded from the generator): the same distribution and
formula, reproducible per generator seed, but not the numbers of torch.randn. kl() is the fused per-sample KL
(against N(0, I), or against `other` as the prior); mode() and nll() stay as they are (nothing to fuse).
"""
from __future__ import annotations

import sys

from ..ops.gaussian import gaussian_kl, reparameterize
from ._base import Adapter, Uncovered, bind
from .taming import vqgan_forward

_VAE = "diffusers.models.autoencoders.vae"
_HINT = "diffusers (pip install diffusers)"


class VectorQuantizer(Adapter):
    name = "diffusers VectorQuantizer"
    module = _VAE
    class_name = "VectorQuantizer"
    install_hint = _HINT

    def forward(self, module, z):
        return vqgan_forward(module, z)


class DiagonalGaussianDistribution(Adapter):
    name = "diffusers DiagonalGaussianDistribution"
    module = _VAE
    class_name = "DiagonalGaussianDistribution"
    methods = ("sample", "kl")
    install_hint = _HINT

    def uncovered(self, posterior):
        return "deterministic=True" if posterior.deterministic else None

    def sample(self, posterior, generator=None):
        if generator is not None and generator.device.type != posterior.mean.device.type:
            raise Uncovered("a generator on another device than the latents")
        return reparameterize(posterior.mean, posterior.logvar, generator=generator)

    def kl(self, posterior, other=None):
        if other is not None and getattr(other, "deterministic", False):
            raise Uncovered("kl(other) for a deterministic other")
        prior = () if other is None else (other.mean, other.logvar)
        if posterior.mean.dim() == 4:
            return gaussian_kl(posterior.mean, posterior.logvar, *prior, reduction="per_sample")
        # diffusers sums over dims 1-3 whatever the rank (video latents keep their frame axis)
        return gaussian_kl(posterior.mean, posterior.logvar, *prior, reduction="none").sum(dim=[1, 2, 3])


POSTERIOR = DiagonalGaussianDistribution()


class GaussianAutoencoder(Adapter):
    """AutoencoderKL and its relatives: any class whose encode() builds diffusers' DiagonalGaussianDistribution.

    Patching an instance makes its encode() hand out patched posteriors; the class-level form is patching
    DiagonalGaussianDistribution itself.
    """

    name = "diffusers AutoencoderKL"
    methods = ("encode",)

    def owner(self, klass):
        for k in klass.__mro__:
            if "encode" in vars(k):
                defined_in = sys.modules.get(getattr(vars(k)["encode"], "__module__", None))
                dgd = getattr(defined_in, "DiagonalGaussianDistribution", None)
                return k if isinstance(dgd, type) and POSTERIOR.is_target(dgd) else None
        return None

    def load(self):
        return None

    def encode(self, model, *args, **kwargs):
        out = type(model).encode(model, *args, **kwargs)
        bind(POSTERIOR, out.latent_dist if hasattr(out, "latent_dist") else out[0])
        return out


ADAPTERS = (VectorQuantizer(), POSTERIOR, GaussianAutoencoder())
