"""The flow's pre-norm causal transformer layer, with a one-token decoding path for the sequential inverse.

``forward`` runs any number of tokens through ``SelfAttention`` (optionally into a ``KVCache``);
``decode`` runs exactly one token per row with the same kernels, minus module calls and the
sequence axis, which is what keeps the flow's sequential sampler at one token of work per step.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from starflow.nn.attention import KVCache, SelfAttention
from starflow.nn.mlp import MLP
from starflow.nn.packed_linear import plain_linear
from starflow.nn.norms import make_norm, norm_2d


class Attention(SelfAttention):
    """Pre-norm attention: ``norm`` (LayerNorm or RMSNorm) then ``SelfAttention``; QK-norm is torch's RMSNorm."""

    def __init__(self, width: int, head_dim: int, norm: str, qk_norm: bool, num_kv_heads: int | None = None):
        super().__init__(width, width // head_dim, num_kv_heads, nn.RMSNorm if qk_norm else None, head_dim)
        self.norm = make_norm(norm, width)

    def forward(self, x, mask, cache: KVCache | None = None, start: int = 0, rope=None):
        """``rope``: a ``starflow.nn.rope.Rotary`` over the sequence's slots; x holds slots start.."""
        return super().forward(self.norm(x), mask, cache, start, rope)

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int, key_mask: torch.Tensor | None,
               linear=plain_linear) -> torch.Tensor:
        """One new token per row, x [R, C] -> [R, C], at cache position ``pos``. The same kernels as
        ``forward`` with T = 1 (so the same numbers with ``plain_linear``), minus the module calls and the
        sequence axis. ``key_mask`` [R, 1, 1, >= pos + 1] bool hides padded prefix keys; None when nothing
        is hidden. ``linear(x, layer)``: the matmul kernel (``starflow.nn.packed_linear``)."""
        R, C = x.shape
        qkv = linear(norm_2d(self.norm, x), self.qkv).view(R, 3, self.num_heads, 1, self.head_dim)
        q, k, v = qkv.unbind(1)
        if not isinstance(self.q_norm, nn.Identity):
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if cache.k is None:  # a block without a prefix has written nothing yet
            cache.allocate(R, self.num_heads, self.head_dim, v)
        cache.k[:, :, pos:pos + 1] = k
        cache.v[:, :, pos:pos + 1] = v
        mask = None if key_mask is None else key_mask[..., :pos + 1]
        out = F.scaled_dot_product_attention(q, cache.k[:, :, :pos + 1], cache.v[:, :, :pos + 1], attn_mask=mask)
        return linear(out.view(R, C), self.proj)


class TransformerLayer(nn.Module):
    def __init__(self, width: int, head_dim: int, mlp_ratio: float, norm: str = "layernorm", qk_norm: bool = False,
                 num_kv_heads: int | None = None, swiglu: bool = False):
        super().__init__()
        self.attention = Attention(width, head_dim, norm, qk_norm, num_kv_heads)
        self.mlp = MLP(width, mlp_ratio, norm, swiglu)

    def forward(self, x, mask, cache: KVCache | None = None, start: int = 0, rope=None):
        x = x + self.attention(x, mask, cache, start, rope)
        return x + self.mlp(x)

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int, key_mask: torch.Tensor | None = None,
               linear=plain_linear) -> torch.Tensor:
        """Cached decoding of one token per row, x [R, C] (see ``Attention.decode``)."""
        x = x + self.attention.decode(x, cache, pos, key_mask, linear)
        return x + self.mlp.decode(x, linear)
