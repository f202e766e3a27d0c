"""Patch discriminator and hinge losses for sharpening a decoder (the adversarial half of the SD-VAE /
VQGAN autoencoder loss). A decoder trained on L1/L2 alone draws the *mean* of the images that a noisy
latent could have come from, which is blurred; a patch discriminator penalises that blur locally, so the
decoder draws one sharp, plausible image instead. Used by ``finetune_decoder(..., adv_weight > 0)``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PatchDiscriminator(nn.Module):
    """Strided convolutions to a grid of real/fake logits, one per receptive-field patch (pix2pix's PatchGAN,
    with GroupNorm instead of BatchNorm so real and fake batches are normalised per image, not together).
    Spectral norm was tried first and could not reach the hinge margin on decoder outputs that differ from
    the real images only at the edges (its loss stayed at chance)."""

    def __init__(self, in_channels: int, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers, c = [], in_channels
        for i, out in enumerate(channels):
            layers.append(nn.Conv2d(c, out, 4, stride=2 if i < len(channels) - 1 else 1, padding=1))
            if i:  # no normalisation on the first layer, as in PatchGAN
                layers.append(nn.GroupNorm(8, out))
            layers.append(nn.LeakyReLU(0.2))
            c = out
        layers.append(nn.Conv2d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def discriminator_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def generator_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.mean()


def adaptive_adversarial_weight(rec_loss: torch.Tensor, adv_loss: torch.Tensor, last_layer: torch.Tensor,
                                max_weight: float = 1e4) -> torch.Tensor:
    """Scale that gives the adversarial term the reconstruction term's gradient norm at the decoder's last
    layer (Esser et al. 2021), so one ``adv_weight`` works across datasets and loss scales."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()
