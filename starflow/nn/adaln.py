"""adaLN(-Zero) conditioning of DiT-style blocks: ``modulate``, the conditioning-free LayerNorm it
modulates, the zero initialisation that makes every block start as the identity, and the final layer."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift. `scale` starts at 0, so an untrained block sees plain LN."""
    return x * (1 + scale) + shift


def adaln_norm(width: int) -> nn.LayerNorm:
    """The LayerNorm adaLN modulates: no affine parameters of its own (shift/scale come from the condition)."""
    return nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + linear to patch pixels; zero-initialised, so the
    untrained network predicts velocity 0."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = adaln_norm(width)
        self.modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if c.ndim == 2:  # global conditioning vector -> broadcast over positions
            c = c.unsqueeze(1)
        shift, scale = self.modulation(F.silu(c)).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


def init_adaln_zero(module: nn.Module) -> None:
    """DiT initialisation: xavier-uniform linears, zero biases; then zero every adaLN regressor
    and the final projection so each residual block and the output start at zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for name, m in module.named_modules():
        if name.endswith("modulation") or name.endswith("final.linear"):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
