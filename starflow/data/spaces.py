"""8-bit images <-> the float spaces models work in, dequantisation, and the bits/dim formula.

Two uint8 -> [-1, 1] maps are in use, each for a reason:

* **bins** (pixel flows). A flow models a continuous density, so pixel value p stands for the whole
  bin [p, p + 1) / 256 of the unit interval, mapped to y = 2u - 1 = (p + d) / 128 - 1. Training and
  likelihoods draw d ~ U[0, 1) (uniform dequantisation); a single point uses the bin centre d = 0.5;
  back to 8 bits is floor((y + 1) * 128), which inverts both exactly.
* **linear** (autoencoders, feature extractors, classifiers): y = p / 127.5 - 1, so 0 and 255 land on
  -1 and 1 exactly; back to 8 bits rounds.

Bits/dim: with D dimensions and the bin map, the density of the 8-bit data is the density of y times
the bin volume (2/256)^D, so bits/dim = NLL_y (nats/dim) / ln 2 + log2(128) = NLL_y / ln 2 + 7.
"""
from __future__ import annotations

import math

import torch

BITS_PER_DIM_OFFSET = 7.0  # log2(256 / 2): the bin width of one 8-bit value in y = 2u - 1 space
LN2 = math.log(2)


# ---- bins (pixel flows) -----------------------------------------------------------------------------
def add_dequantization_noise(images: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """uint8 images and U[0, 1) noise of the same shape -> y = (p + noise) / 128 - 1."""
    return (images.float() + noise) / 128.0 - 1.0


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> continuous y = 2u - 1 with u = (pixel + U[0,1)) / 256. The noise is drawn on
    the generator's device (the images' when there is none) and moved to the images."""
    device = images.device if generator is None else generator.device
    noise = torch.rand(images.shape, generator=generator, device=device)
    return add_dequantization_noise(images, noise.to(images.device))


def bin_centres(images: torch.Tensor) -> torch.Tensor:
    """uint8 -> the centre of each pixel's dequantisation bin, (p + 0.5) / 128 - 1."""
    return add_dequantization_noise(images, 0.5)


def bins_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> uint8 by bin: floor((y + 1) * 128), clamped; inverts ``dequantize`` and ``bin_centres``."""
    return ((x.float() + 1.0) * 128.0).floor().clamp(0, 255).to(torch.uint8)


# ---- linear (autoencoders, feature extractors) ------------------------------------------------------
def uint8_to_linear(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1] with 0 -> -1 and 255 -> 1."""
    return images.float() / 127.5 - 1.0


def linear_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded); inverts ``uint8_to_linear``."""
    return x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)


# ---- likelihood units ---------------------------------------------------------------------------------
def bits_per_dim(nats_per_dim):
    """NLL of dequantised 8-bit data in bin space (nats/dim) -> bits/dim of the 8-bit data. Works on
    tensors, arrays and floats."""
    return nats_per_dim / LN2 + BITS_PER_DIM_OFFSET


__all__ = ["BITS_PER_DIM_OFFSET", "add_dequantization_noise", "dequantize", "bin_centres", "bins_to_uint8",
           "uint8_to_linear", "linear_to_uint8", "bits_per_dim"]
