"""Normalisation layers shared by the flow and the peers, and the functional form the decoder calls."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_norm(kind: str, dim: int) -> nn.Module:
    """``"layernorm"`` -> LayerNorm, anything else -> torch's RMSNorm (the flow's pre-norms)."""
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


def norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The functional form of a LayerNorm/RMSNorm module: the same kernel without the module call."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain, computed in float32: under bf16 autocast the mean of
    squares of a wide vector loses too many bits to be a reliable normaliser (the peers' QK-norm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class OffsetRMSNorm(nn.Module):
    """RMSNorm whose gain is stored as an offset from 1 (zero-initialised) and applied in fp32: the
    released STARFlow model's final norm, kept in its parametrisation so bf16 weights lose nothing."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        h = x.float() if x.dtype != torch.float64 else x
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1 + self.weight.to(h.dtype))).type_as(x)
