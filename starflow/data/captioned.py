"""Captioned images as tensors: labels are indices into a table of unique captions, so text-encoder
outputs are computed once per caption and looked up per batch."""
from __future__ import annotations

import torch

from starflow.data.tensors import LabelledImages


class CaptionedImages(LabelledImages):
    def __init__(self, images: torch.Tensor, captions: list[str]):
        if len(images) != len(captions):
            raise ValueError(f"{len(images)} images but {len(captions)} captions")
        self.captions = sorted(set(captions))
        index = {c: i for i, c in enumerate(self.captions)}
        self.images = images
        self.labels = torch.tensor([index[c] for c in captions], dtype=torch.long)


class TextTable:
    """Text-encoder outputs for every unique caption, padded to one length; rows looked up by label."""

    def __init__(self, text_encoder, captions: list[str], batch_size: int = 256):
        self.captions = list(captions)
        emb = text_encoder.encode_dataset(self.captions, batch_size=batch_size)
        self.states, self.mask, self.pooled = emb.states, emb.mask, emb.pooled

    def to(self, device):
        self.states, self.mask, self.pooled = (t.to(device) for t in (self.states, self.mask, self.pooled))
        return self

    def lookup(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ids = ids.to(self.states.device)
        return self.states[ids], self.mask[ids], self.pooled[ids]
