"""Tiny stand-in models for the app tests (the shipped models may not exist; MiniLM takes seconds to load)."""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from starflow import FlowConfig, STARFlow
from starflow.pipeline import StarflowPipeline


@dataclass
class _Embedding:
    states: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class HashTextEncoder:
    """Deterministic word-hash embeddings: each word gets a fixed random vector (seeded by its CRC32)."""

    def __init__(self, dim: int = 16, max_length: int = 8):
        self.dim, self.max_length = dim, max_length

    def _word(self, w: str) -> torch.Tensor:
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def encode(self, prompts):
        words = [p.lower().split()[: self.max_length] or ["<empty>"] for p in prompts]
        L = max(len(w) for w in words)
        states = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for b, ws in enumerate(words):
            for i, w in enumerate(ws):
                states[b, i] = self._word(w)
                mask[b, i] = True
        pooled = states.sum(1) / mask.sum(1, keepdim=True)
        return _Embedding(states, mask, pooled)

    def to(self, device):
        return self


def _perturb(model, scale=0.02, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def digits_pipe() -> StarflowPipeline:
    cfg = FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, num_classes=10)
    return StarflowPipeline(_perturb(STARFlow(cfg)))


def text_pipe() -> StarflowPipeline:
    cfg = FlowConfig(in_channels=3, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2,
                     layers_per_block=1, cond_dim=16, max_text_tokens=8)
    return StarflowPipeline(_perturb(STARFlow(cfg), seed=1), text_encoder=HashTextEncoder(16, 8))
