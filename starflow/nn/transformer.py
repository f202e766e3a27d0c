"""A pre-norm causal transformer with an optional preallocated key/value cache.

The cache is what makes the flow's sequential inverse cost one token of work per step: keys and
values of positions already decoded are written once into fixed buffers, never concatenated.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim)


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


class KVCache:
    """Fixed-size key/value buffers for one attention layer, allocated on first write."""

    def __init__(self, max_len: int):
        self.max_len = max_len
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
        return self.k[:, :, :end], self.v[:, :, :end]

    def allocate(self, rows: int, heads: int, head_dim: int, like: torch.Tensor) -> None:
        """Create the buffers up front (the one-token decoder writes into them directly)."""
        if self.k is None:
            self.k = like.new_empty(rows, heads, self.max_len, head_dim)
            self.v = like.new_empty(rows, heads, self.max_len, head_dim)


def norm_2d(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The functional form of a LayerNorm/RMSNorm module: the same kernel without the module call."""
    if isinstance(norm, nn.LayerNorm):
        return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)
    return F.rms_norm(x, norm.normalized_shape, norm.weight, norm.eps)


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


class Attention(nn.Module):
    def __init__(self, width: int, head_dim: int, norm: str, qk_norm: bool, num_kv_heads: int | None = None):
        super().__init__()
        self.num_heads = width // head_dim
        self.num_kv_heads = num_kv_heads or self.num_heads  # fewer: grouped-query attention
        self.head_dim = head_dim
        self.norm = make_norm(norm, width)
        self.qkv = nn.Linear(width, (self.num_heads + 2 * self.num_kv_heads) * head_dim)
        self.proj = nn.Linear(width, width)
        self.q_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(head_dim) if qk_norm else nn.Identity()

    def _split_heads(self, x):
        B, T, _ = x.shape
        if self.num_kv_heads == self.num_heads:
            qkv = self.qkv(self.norm(x)).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            return qkv[0], qkv[1], qkv[2]
        sizes = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        q, k, v = self.qkv(self.norm(x)).split(sizes, dim=-1)
        return tuple(t.view(B, T, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))

    def forward(self, x, mask, cache: KVCache | None = None, start: int = 0, rope=None):
        """``rope``: a ``starflow.nn.rope.Rotary`` over the sequence's slots; x holds slots start.."""
        B, T, C = x.shape
        q, k, v = self._split_heads(x)
        # QK-norm may run in fp32 under autocast; attention wants one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if rope is not None:
            q, k = rope.apply(q, start), rope.apply(k, start)
        if cache is not None:
            k, v = cache.write(k, v, start)
        gqa = {"enable_gqa": True} if self.num_kv_heads != self.num_heads else {}
        if isinstance(mask, str):  # CAUSAL: no explicit mask, so fused kernels (flash on GPUs) can run
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int, key_mask: torch.Tensor | None) -> torch.Tensor:
        """One new token per row, x [R, C] -> [R, C], at cache position ``pos``. The same kernels as
        ``forward`` with T = 1 (so the same numbers), minus the module calls and the sequence axis.
        ``key_mask`` [R, 1, 1, >= pos + 1] bool hides padded prefix keys; None when nothing is hidden."""
        R, C = x.shape
        qkv = F.linear(norm_2d(self.norm, x), self.qkv.weight, self.qkv.bias).view(R, 3, self.num_heads, 1, self.head_dim)
        q, k, v = qkv.unbind(1)
        if not isinstance(self.q_norm, nn.Identity):
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if cache.k is None:  # a block without a prefix has written nothing yet
            cache.allocate(R, self.num_heads, self.head_dim, v)
        cache.k[:, :, pos:pos + 1] = k
        cache.v[:, :, pos:pos + 1] = v
        mask = None if key_mask is None else key_mask[..., :pos + 1]
        out = F.scaled_dot_product_attention(q, cache.k[:, :, :pos + 1], cache.v[:, :, :pos + 1], attn_mask=mask)
        return F.linear(out.view(R, C), self.proj.weight, self.proj.bias)


class MLP(nn.Module):
    """GELU MLP, or with ``swiglu`` the gated form down(gelu_tanh(gate(x)) * up(x)) of the official code."""

    def __init__(self, width: int, ratio: float, norm: str, swiglu: bool = False):
        super().__init__()
        hidden = int(width * ratio)
        self.norm = make_norm(norm, width)
        self.swiglu = swiglu
        if swiglu:
            self.gate_proj, self.up_proj = nn.Linear(width, hidden), nn.Linear(width, hidden)
            self.down_proj = nn.Linear(hidden, width)
        else:
            self.main = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x):
        if self.swiglu:
            h = self.norm(x)
            return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))
        return self.main(self.norm(x))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        up, act, down = self.main
        return F.linear(act(F.linear(norm_2d(self.norm, x), up.weight, up.bias)), down.weight, down.bias)


class TransformerLayer(nn.Module):
    def __init__(self, width: int, head_dim: int, mlp_ratio: float, norm: str = "layernorm", qk_norm: bool = False,
                 num_kv_heads: int | None = None, swiglu: bool = False):
        super().__init__()
        self.attention = Attention(width, head_dim, norm, qk_norm, num_kv_heads)
        self.mlp = MLP(width, mlp_ratio, norm, swiglu)

    def forward(self, x, mask, cache: KVCache | None = None, start: int = 0, rope=None):
        x = x + self.attention(x, mask, cache, start, rope)
        return x + self.mlp(x)

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Cached decoding of one token per row, x [R, C] (see ``Attention.decode``)."""
        x = x + self.attention.decode(x, cache, pos, key_mask)
        return x + self.mlp.decode(x)
