"""Multi-head attention for every transformer in the package, with an optional preallocated KV cache.

The flow, FlowAR's AR trunk and head, and MM-DiT all use the same head layout: one fused QKV
projection whose output is [q heads | k heads | v heads], optional QK-norm per head, scaled
dot-product attention, one output projection. ``SelfAttention`` is that module; MM-DiT's joint
attention, whose two streams own separate projections, calls the same ``split_heads`` /
``attend`` / ``merge_heads`` pieces.

The cache is what makes the flow's sequential inverse cost one token of work per step: keys and
values of positions already processed are written once into fixed buffers, never concatenated.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

# Returned by ``attention_mask`` for a plain causal square (training, likelihoods): attention then runs
# with ``is_causal=True`` and no mask tensor, which lets GPU flash/efficient kernels take it.
CAUSAL = "causal"


def attention_mask(q_start: int, q_len: int, key_valid: torch.Tensor | None, device) -> torch.Tensor | str | None:
    """Boolean mask [B or 1, 1, q_len, q_start+q_len]: causal, and padding keys (key_valid False) hidden.

    A position may always see itself, so a padded query never has an empty row (no NaN). None when
    nothing is hidden (one new token, no padding): the cheap path of cached decoding. ``CAUSAL`` when
    the mask would be exactly lower-triangular (queries from position 0, no padding).
    """
    if q_len == 1 and key_valid is None:
        return None
    if q_start == 0 and key_valid is None:
        return CAUSAL
    k_len = q_start + q_len
    q_pos = torch.arange(q_start, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if key_valid is None:
        return mask[None, None]
    valid = key_valid[:, None, None, :k_len]
    return (mask[None, None] & valid) | (k_pos == q_pos)[None, None]


class KVCache:
    """Fixed-size key/value buffers [B, H, max_len, Dh] for one attention layer, allocated on first write.

    ``write`` puts new keys/values at ``start`` and returns everything up to them; ``length`` is the end
    of the last ``write`` (callers that append chunk after chunk read it as the next start)."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise IndexError(f"KV cache of length {self.max_len} cannot hold position {end - 1}")
        if self.k is None:
            B, H, _, Dh = k.shape
            self.k = k.new_empty(B, H, self.max_len, Dh)
            self.v = v.new_empty(B, H, self.max_len, Dh)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def allocate(self, rows: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        """Create the buffers up front (the one-token decoder writes into them directly)."""
        if self.k is None:
            self.k = like.new_empty(rows, heads, self.max_len, head_dim)
            self.v = like.new_empty(rows, heads, self.max_len, head_dim)


def split_heads(qkv: torch.Tensor, heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused projection output [B, T, 3*heads*head_dim] -> q, k, v as [B, heads, T, head_dim] (views)."""
    B, T, _ = qkv.shape
    q, k, v = qkv.view(B, T, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    return q, k, v


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """[B, H, T, Dh] -> [B, T, H*Dh]."""
    B, H, T, Dh = out.shape
    return out.transpose(1, 2).reshape(B, T, H * Dh)


def attend(q, k, v, mask: torch.Tensor | str | None = None, gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention; ``mask`` is a bool tensor (True = may attend), None, or ``CAUSAL``
    (no mask tensor, so fused kernels can run). ``gqa``: k/v carry fewer heads than q."""
    extra = {"enable_gqa": True} if gqa else {}
    if isinstance(mask, str):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **extra)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **extra)


class SelfAttention(nn.Module):
    """Fused-QKV multi-head self-attention (no input norm: the block owns it).

    ``num_kv_heads`` below ``num_heads`` is grouped-query attention. ``qk_norm`` builds the per-head
    QK-norm from the head width (None: none). ``forward`` takes an optional ``KVCache`` (keys/values
    written at ``start``) and an optional ``starflow.nn.rope.Rotary`` over the sequence's slots.
    """

    def __init__(self, width: int, num_heads: int, num_kv_heads: int | None = None,
                 qk_norm: Callable[[int], nn.Module] | None = None, head_dim: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = head_dim or width // num_heads
        self.qkv = nn.Linear(width, (self.num_heads + 2 * self.num_kv_heads) * self.head_dim)
        self.proj = nn.Linear(width, width)
        self.q_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = qk_norm(self.head_dim) if qk_norm else nn.Identity()

    def heads(self, h: torch.Tensor):
        """q, k, v [B, heads, T, Dh] of the (already normalised) input h [B, T, C], QK-norm applied."""
        if self.num_kv_heads == self.num_heads:
            q, k, v = split_heads(self.qkv(h), self.num_heads, self.head_dim)
        else:
            B, T, _ = h.shape
            sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
            q, k, v = (t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in self.qkv(h).split(sizes, dim=-1))
        # QK-norm may run in fp32 under autocast; attention wants one dtype.
        return self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype), v

    def forward(self, h: torch.Tensor, mask: torch.Tensor | str | None = None, cache: KVCache | None = None,
                start: int = 0, rope=None) -> torch.Tensor:
        q, k, v = self.heads(h)
        if rope is not None:
            q, k = rope.apply(q, start), rope.apply(k, start)
        if cache is not None:
            k, v = cache.write(k, v, start)
        out = attend(q, k, v, mask, gqa=self.num_kv_heads != self.num_heads)
        return self.proj(merge_heads(out))
