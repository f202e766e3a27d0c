"""Embeddings of the peers: the diffusion timestep, and fixed 2-D sin-cos position tables (two layouts)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> sinusoidal features -> MLP. t is multiplied by 1000 first so the usual
    frequency range (periods 1 .. 10^4) resolves the unit interval finely."""

    def __init__(self, width: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = 1000.0 * t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


def sincos_pos_embed(side: int, dim: int, extent: float | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding for a side x side grid, row-major: [side*side, dim].

    Positions are the cell centres in units of `extent / side` (default extent = side, i.e. integer
    grid). FlowAR passes extent = full side so that a coarse cell and the fine cells it covers
    share the same spatial coordinates across scales.
    """
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    extent = float(side) if extent is None else float(extent)
    coords = (torch.arange(side, dtype=torch.float64) + 0.5) * (extent / side)
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([embed_1d(rows), embed_1d(cols)], dim=1).float()


POS_EMBED_STYLES = ("centres", "sd3")


def sd3_pos_embed(grid: int, dim: int, max_size: int = 0, base_size: int = 0) -> torch.Tensor:
    """SD3's 2-D sin-cos table for a grid x grid patch image, row-major: [grid*grid, dim].

    SD3 builds one max_size x max_size table whose integer positions are rescaled by
    base_size / max_size (base_size = the training grid), and crops its centre for the image at
    hand. The first half of each vector encodes the COLUMN, the second the row (the reverse of
    `sincos_pos_embed`), and positions are cell corners, not centres. max_size / base_size of 0
    mean "= grid" (no crop, integer positions).
    """
    if dim % 4:
        raise ValueError(f"position embedding width must be divisible by 4, got {dim}")
    max_size, base_size = max_size or grid, base_size or grid
    if grid > max_size:
        raise ValueError(f"image grid {grid} exceeds the position table's max size {max_size}")
    # float32 positions then float64 trigonometry, as the reference computes them.
    coords = (torch.arange(max_size, dtype=torch.float32) / (max_size / base_size)).double()
    quarter = dim // 4
    omega = 1.0 / 10_000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos):
        angles = torch.outer(pos.reshape(-1), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    table = torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float().view(max_size, max_size, dim)
    top = (max_size - grid) // 2
    return table[top:top + grid, top:top + grid].reshape(grid * grid, dim).contiguous()
