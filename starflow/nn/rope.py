"""Rotary position embeddings for a flow block's token sequence (optional prefix, then image tokens).

Layout (the released STARFlow model's): each head's channels are rotated in interleaved pairs
(2j, 2j+1), one angle per pair. Image token (r, c) of an h x w grid sits at (r, c) scaled by
``side / sqrt(h w)`` (so the model's square grid keeps integer positions and other grids keep its
area). Without a prefix the pairs split evenly between the row and the column axis (2-D). With a
prefix axis (3-D) the last 8 pairs belong to a third axis on which prefix token t of P sits at
``t / P * side`` and image tokens at 0, while prefix tokens sit at row = column = 0.

Angles are per *sequence slot*, not per token: a block that reverses its token order still gives slot
j the position of grid cell j. That is how the released model was trained.
"""
from __future__ import annotations

import math

import torch

PREFIX_AXIS_PAIRS = 8


def _frequencies(num: int, span: int, theta: float, step: int) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, span, step, dtype=torch.float64)[:num] / span)


def check_rope_head_dim(head_dim: int, prefix_axis: bool) -> str | None:
    """None if rotary positions fit ``head_dim``, else the reason they do not."""
    half = head_dim // 2
    if head_dim % 4:
        return f"rotary positions need head_dim divisible by 4, got {head_dim}"
    if prefix_axis and (half < PREFIX_AXIS_PAIRS or (half - PREFIX_AXIS_PAIRS) % 2):
        return f"rotary positions with a prefix axis need head_dim >= 16 and divisible by 4, got {head_dim}"
    return None


def rope_angles(head_dim: int, grid: tuple[int, int], side: int, prefix_len: int = 0,
                prefix_axis: bool = False, theta: float = 10000.0) -> torch.Tensor:
    """Angles [prefix_len + h*w, head_dim] (float64, each pair's angle repeated twice) for the slots
    of a sequence made of ``prefix_len`` prefix tokens then an h x w grid in row-major order."""
    half = head_dim // 2
    h, w = grid
    scale = side / math.sqrt(h * w)
    rows = torch.arange(h, dtype=torch.float64).repeat_interleave(w) * scale
    cols = torch.arange(w, dtype=torch.float64).repeat(h) * scale
    if prefix_axis:
        xy = half - PREFIX_AXIS_PAIRS
        f_xy = _frequencies(xy // 2, xy, theta, 2)
        f_p = _frequencies(PREFIX_AXIS_PAIRS, PREFIX_AXIS_PAIRS, theta, 1)
        third = torch.zeros_like(rows)
        if prefix_len:
            zeros = torch.zeros(prefix_len, dtype=torch.float64)
            rows, cols = torch.cat([zeros, rows]), torch.cat([zeros, cols])
            third = torch.cat([torch.arange(prefix_len, dtype=torch.float64) / prefix_len * side, third])
        angles = torch.cat([rows[:, None] * f_xy, cols[:, None] * f_xy, third[:, None] * f_p], dim=-1)
    else:
        if prefix_len:
            raise ValueError("a prefix needs the prefix axis (3-D rotary layout)")
        f = _frequencies(half // 2, half, theta, 2)
        angles = torch.cat([rows[:, None] * f, cols[:, None] * f], dim=-1)
    return angles.repeat_interleave(2, dim=-1)


class Rotary:
    """cos / sin tables of a sequence's slots (computed in float64 on the CPU, then moved; float32 on
    devices without float64, e.g. MPS); ``apply`` rotates the slots one attention call holds."""

    def __init__(self, angles: torch.Tensor, device=None):
        device = torch.device(device or "cpu")
        wide = torch.float32 if device.type == "mps" else torch.float64
        self.cos, self.sin = (t.to(wide).to(device) for t in (angles.cos(), angles.sin()))
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Rotate in at least fp32 (bf16 activations are promoted, then cast back by the caller).
        dtype = torch.promote_types(dtype, torch.float32)
        if dtype not in self._cast:
            self._cast[dtype] = (self.cos.to(dtype), self.sin.to(dtype))
        return self._cast[dtype]

    def apply(self, t: torch.Tensor, start: int) -> torch.Tensor:
        """Rotate t [B, H, T, Dh] as slots start..start+T-1."""
        cos, sin = self.tables(t.dtype)
        T = t.shape[2]
        cos, sin = cos[start:start + T], sin[start:start + T]
        pairs = t.unflatten(-1, (-1, 2))
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
        return (t * cos + rotated * sin).to(t.dtype)
