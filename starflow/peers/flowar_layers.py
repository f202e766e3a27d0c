"""FlowAR's building blocks: the block-causal AR transformer's layers (with a KV cache) and the
flow-matching head with Spatial-adaLN. The model that assembles them is in flowar.py."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from starflow.peers.mmdit import FeedForward, FinalLayer, TimestepEmbedder, init_adaln_zero, modulate, sincos_pos_embed

# --------------------------------------------------------------------------------------------
# Attention with an optional KV cache
# --------------------------------------------------------------------------------------------


class LayerKV:
    """Keys and values of every position one attention layer has processed so far."""

    def __init__(self):
        self.k = self.v = None

    def extend(self, k: torch.Tensor, v: torch.Tensor):
        # Scales arrive in a handful of chunks, so concatenation (not a preallocated buffer) is cheap.
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, cache: LayerKV | None = None):
        """mask: bool [B, 1, Lq, Lk] (True = may attend), Lk = cached + new positions."""
        q, k, v = rearrange(self.qkv(x), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        if cache is not None:
            k, v = cache.extend(k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class ARBlock(nn.Module):
    """Pre-norm transformer block (nanoGPT shape)."""

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = FeedForward(width, mlp_ratio)

    def forward(self, x, mask, cache=None):
        x = x + self.attn(self.norm1(x), mask, cache)
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
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
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
