"""Encoder and decoder shared by the reference models: 8x8x1 images <-> 4x4 latents."""
from torch import nn


def encoder(out_channels: int, width: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.SiLU(),
        nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(width, out_channels, 1),
    )


def decoder(in_channels: int, width: int = 64) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
        nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
        nn.Conv2d(width, 1, 3, padding=1),
    )
