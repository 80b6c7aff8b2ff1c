"""Reference models built on the ops: a small convolutional VAE and VQ-VAE for 8x8 images.

Both take `eager=True` to run the same architecture with the eager PyTorch formulas instead of the fused ops,
which is how the demo measures what the ops buy.
"""
from .vae import ConvVAE
from .vqvae import ConvVQVAE

__all__ = ["ConvVAE", "ConvVQVAE"]
