"""An in-memory image dataset: a uint8 image tensor and a label tensor, served whole or by index batch."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset


class LabelledImages(Dataset):
    """Subclasses set ``self.images`` ([N, C, H, W] uint8) and ``self.labels`` ([N] long). ``get_batch``
    lets the trainer index a whole batch at once instead of stacking items."""

    images: torch.Tensor
    labels: torch.Tensor

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def get_batch(self, idx: torch.Tensor):
        return self.images[idx], self.labels[idx]
