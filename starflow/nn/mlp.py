"""Feed-forward layers: the plain GELU MLP of DiT/GPT blocks and the flow's pre-norm MLP (GELU or SwiGLU)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from starflow.nn.norms import make_norm, norm_2d
from starflow.nn.packed_linear import plain_linear


class FeedForward(nn.Sequential):
    """Linear -> GELU -> Linear with hidden width int(dim * mlp_ratio). ``approximate="tanh"`` is the
    DiT/SD3 GELU (the peers), ``"none"`` the exact one (the flow). A Sequential, so its weights are
    ``0.*`` and ``2.*`` in a state dict."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0, approximate: str = "tanh"):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate=approximate), nn.Linear(hidden, dim))


class MLP(nn.Module):
    """Pre-norm MLP: norm then GELU FeedForward (``main``), or with ``swiglu`` the gated form
    down(gelu_tanh(gate(x)) * up(x)) of the official STARFlow code."""

    def __init__(self, width: int, ratio: float, norm: str, swiglu: bool = False):
        super().__init__()
        hidden = int(width * ratio)
        self.norm = make_norm(norm, width)
        self.swiglu = swiglu
        if swiglu:
            self.gate_proj, self.up_proj = nn.Linear(width, hidden), nn.Linear(width, hidden)
            self.down_proj = nn.Linear(hidden, width)
        else:
            self.main = FeedForward(width, ratio, approximate="none")

    def forward(self, x):
        if self.swiglu:
            h = self.norm(x)
            return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return self.main(self.norm(x))

    def decode(self, x: torch.Tensor, linear=plain_linear) -> torch.Tensor:
        """One token per row, x [R, C]: the GELU path with functional kernels (no module calls);
        ``linear(x, layer)`` is the matmul kernel (``starflow.nn.packed_linear``)."""
        up, act, down = self.main
        return linear(act(linear(norm_2d(self.norm, x), up)), down)
