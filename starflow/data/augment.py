"""Shifted copies: a small image set grown by translating every image a pixel or two.

For the 4,500 training digits a flow memorises the set (test likelihood stops improving while the
training loss falls); copies shifted by up to ``max_shift`` pixels are new, plausible digits of the same
class. Shifts pad by repeating the edge, which is the background for centred digits. The copies are
materialised once, so latent training caches their encodings like the originals (the cache key covers
the image bytes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from starflow.data.tensors import LabelledImages


def shift_images(images: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """[N, C, H, W] images moved dy rows down and dx columns right, edges repeated."""
    if dy == 0 and dx == 0:
        return images
    H, W = images.shape[-2:]
    p = max(abs(dy), abs(dx))
    padded = F.pad(images.float(), (p, p, p, p), mode="replicate").to(images.dtype)
    return padded[..., p - dy:p - dy + H, p - dx:p - dx + W]


class ShiftedCopies(LabelledImages):
    """``base``'s images (first, in order) and their copies at every shift in [-max_shift, max_shift]^2."""

    def __init__(self, base, max_shift: int):
        if not isinstance(base, LabelledImages):
            raise ValueError(f"train.shift_augment needs a labelled image dataset (mnist, digits), not "
                             f"{type(base).__name__}")
        if max_shift < 1:
            raise ValueError(f"max_shift must be >= 1, got {max_shift}")
        shifts = [(0, 0)] + [(dy, dx) for dy in range(-max_shift, max_shift + 1)
                             for dx in range(-max_shift, max_shift + 1) if (dy, dx) != (0, 0)]
        self.images = torch.cat([shift_images(base.images, dy, dx) for dy, dx in shifts])
        self.labels = base.labels.repeat(len(shifts))
        self.num_classes = getattr(base, "num_classes", 0)
        self.copies = len(shifts)
