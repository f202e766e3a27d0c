"""FlowAR's building blocks: the block-causal AR transformer's layers and the flow-matching head with
Spatial-adaLN, made of the shared layers in starflow/nn/. The model that assembles them is in flowar.py."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from starflow.nn.adaln import FinalLayer, adaln_norm, init_adaln_zero, modulate
from starflow.nn.attention import KVCache, SelfAttention
from starflow.nn.embeddings import TimestepEmbedder, sincos_pos_embed
from starflow.nn.mlp import FeedForward

# --------------------------------------------------------------------------------------------
# AR transformer
# --------------------------------------------------------------------------------------------


class ARBlock(nn.Module):
    """Pre-norm transformer block (nanoGPT shape)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio)

    def forward(self, x, mask, cache: KVCache | None = None, start: int = 0):
        """mask: bool [B, 1, Lq, Lk] (True = may attend); with a cache, x holds positions start.. and Lk = start + Lq."""
        x = x + self.attn(self.norm1(x), mask, cache, start)
        return x + self.mlp(self.norm2(x))


def block_causal_mask(block_sizes: Sequence[int], device=None) -> torch.Tensor:
    """[L, L] bool, True where query q may attend to key k: block(k) <= block(q). Causal across
    blocks, bidirectional inside a block."""
    ids = torch.repeat_interleave(torch.arange(len(block_sizes), device=device),
                                  torch.tensor(list(block_sizes), device=device))
    return ids[None, :] <= ids[:, None]


# --------------------------------------------------------------------------------------------
# Flow-matching head with Spatial-adaLN
# --------------------------------------------------------------------------------------------


class SpatialAdaLNBlock(nn.Module):
    """DiT block whose adaLN-Zero parameters vary over positions: `cond` is [B, L, D], one
    conditioning vector per token (semantics of that location + timestep)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = adaln_norm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = adaln_norm(width)
        self.mlp = FeedForward(width, mlp_ratio)
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate_a * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FlowHead(nn.Module):
    """v(z_t, t | s^i, scale i) for one scale's map [B, C, side, side]; weights shared by all scales."""

    def __init__(self, in_channels: int, sem_width: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 scales: Sequence[int], image_size: int):
        super().__init__()
        self.scales = tuple(scales)
        self.in_proj = nn.Linear(in_channels, width)
        self.sem_proj = nn.Linear(sem_width, width)
        self.scale_embed = nn.Embedding(len(scales), width)
        self.time_embed = TimestepEmbedder(width)
        for i, s in enumerate(scales):
            self.register_buffer(f"pos_{i}", sincos_pos_embed(s, width, extent=image_size), persistent=False)
        self.blocks = nn.ModuleList([SpatialAdaLNBlock(width, heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(width, in_channels)
        init_adaln_zero(self)
        nn.init.normal_(self.scale_embed.weight, std=0.02)

    def forward(self, z: torch.Tensor, t: torch.Tensor, sem: torch.Tensor, scale: int) -> torch.Tensor:
        side = z.shape[-1]
        level = self.scale_embed.weight[scale]
        h = self.in_proj(rearrange(z, "b c h w -> b (h w) c")) + getattr(self, f"pos_{scale}") + level
        # Spatial-adaLN conditioning: per-position semantics + the (global) timestep and scale.
        cond = self.sem_proj(sem) + (self.time_embed(t) + level)[:, None, :]
        for block in self.blocks:
            h = block(h, cond)
        return rearrange(self.final(h, cond), "b (h w) c -> b c h w", h=side, w=side)
