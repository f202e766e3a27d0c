"""MM-DiT, the transformer of SD3 (Esser et al. 2024), plus the small pieces both peer systems share.

An MM-DiT block carries two token streams: image patches and condition tokens (class tokens or
text-encoder states). Each stream has its OWN weights — adaLN modulation, norms, QKV, QK-RMSNorm,
output projection, MLP — because the two modalities have different statistics. The streams meet in
ONE attention over their concatenation, so every image token can read every condition token and
vice versa. Global conditioning (timestep embedding + a pooled condition vector) enters through
adaLN-Zero: per-block shift/scale/gate regressed from that vector, zero-initialised so every block
starts as the identity.

Options that make the network the one SD3 defines (see convert.py, which imports diffusers'
`SD3Transformer2DModel` weights): QK-norm can be switched off (SD3-medium has none), the position
table can be SD3's (`pos_embed="sd3"`, persisted in the state dict), and image blocks can carry
SD3.5-medium's second, image-only attention (`dual_attention_layers`). Defaults are unchanged.

The layers it shares with the flow and FlowAR (attention, norms, MLP, embeddings, adaLN) live in
starflow/nn/; `Condition` / `ConditionEncoder` live in conditioning.py.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from starflow.nn.adaln import FinalLayer, adaln_norm, init_adaln_zero, modulate
from starflow.nn.attention import SelfAttention, attend, merge_heads, split_heads
from starflow.nn.embeddings import POS_EMBED_STYLES, TimestepEmbedder, sd3_pos_embed, sincos_pos_embed
from starflow.nn.mlp import FeedForward
from starflow.nn.norms import RMSNorm
from starflow.peers.conditioning import Condition


def qk_norm_layer(head_dim: int, enabled: bool) -> nn.Module:
    # QK-norm keeps attention logits bounded as training goes on; SD3-medium was trained without it.
    return RMSNorm(head_dim) if enabled else nn.Identity()


class StreamWeights(nn.Module):
    """Everything one modality owns inside an MM-DiT block. The image stream and the condition
    stream each get an instance; they share no Parameter.

    `pre_only`: the condition stream of the LAST block only contributes keys/values (its outputs
    are never read again), so it keeps just the pre-attention half — no dead parameters.
    `dual_attention` (image stream only): SD3.5-medium's second, image-only attention (its own QKV,
    QK-norm and output projection, fed by the same LayerNorm) with three more modulation chunks
    (shift, scale, gate), added after the joint attention's residual.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, pre_only: bool = False, qk_norm: bool = True,
                 dual_attention: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        self.head_dim = head_dim = width // heads
        # adaLN-Zero: (shift, scale) for attention input, plus (gate, shift, scale, gate) for the rest,
        # plus (shift, scale, gate) of the second attention.
        self.chunks = 2 if pre_only else (9 if dual_attention else 6)
        self.modulation = nn.Linear(width, self.chunks * width)
        self.norm1 = adaln_norm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = qk_norm_layer(head_dim, qk_norm), qk_norm_layer(head_dim, qk_norm)
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = adaln_norm(width)
            self.mlp = FeedForward(width, mlp_ratio)
        second = dual_attention and not pre_only
        self.attn2 = SelfAttention(width, heads, qk_norm=RMSNorm if qk_norm else None) if second else None

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x: [B, L, D], c: [B, D]. Returns q, k, v as [B, H, L, hd] and the modulation chunks."""
        mod = self.modulation(F.silu(c)).unsqueeze(1).chunk(self.chunks, dim=-1)
        h = modulate(self.norm1(x), mod[0], mod[1])
        q, k, v = split_heads(self.qkv(h), self.heads, self.head_dim)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        out = x + gate_attn * self.proj(merge_heads(attn))
        if self.attn2 is not None:  # reads the block INPUT x, like the joint attention
            shift2, scale2, gate2 = mod[6:]
            out = out + gate2 * self.attn2(modulate(self.norm1(x), shift2, scale2))
        return out + gate_mlp * self.mlp(modulate(self.norm2(out), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, last: bool = False, qk_norm: bool = True,
                 dual_attention: bool = False):
        super().__init__()
        self.image = StreamWeights(width, heads, mlp_ratio, qk_norm=qk_norm, dual_attention=dual_attention)
        self.context = StreamWeights(width, heads, mlp_ratio, pre_only=last, qk_norm=qk_norm)

    def forward(self, img: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor, c: torch.Tensor):
        qi, ki, vi, mod_i = self.image.pre_attention(img, c)
        qc, kc, vc, mod_c = self.context.pre_attention(ctx, c)
        # ONE attention over [context; image]: the only place the two streams exchange information.
        q, k, v = (torch.cat(pair, dim=2) for pair in ((qc, qi), (kc, ki), (vc, vi)))
        keep = torch.cat([ctx_mask, torch.ones(img.shape[:2], dtype=torch.bool, device=img.device)], dim=1)
        out = attend(q, k, v, keep[:, None, None, :])
        out_c, out_i = out.split([ctx.shape[1], img.shape[1]], dim=2)
        img = self.image.post_attention(img, out_i, mod_i)
        ctx = None if self.context.pre_only else self.context.post_attention(ctx, out_c, mod_c)
        return img, ctx


class MMDiT(nn.Module):
    """Velocity network v(z_t, t, condition) for images [B, C, H, W].

    pos_embed: "centres" (default; `sincos_pos_embed`, rebuilt at construction, not saved) or "sd3"
    (`sd3_pos_embed` with pos_embed_max_size / pos_embed_base_size; a persistent buffer, so the
    table a checkpoint was made with travels with it).
    """

    def __init__(self, in_channels: int, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0, qk_norm: bool = True, pos_embed: str = "centres", pos_embed_max_size: int = 0,
                 pos_embed_base_size: int = 0, dual_attention_layers: Sequence[int] = ()):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        if pos_embed not in POS_EMBED_STYLES:
            raise ValueError(f"unknown pos_embed {pos_embed!r}; choose one of {POS_EMBED_STYLES}")
        dual = set(int(i) for i in dual_attention_layers)
        if dual - set(range(depth)):
            raise ValueError(f"dual_attention_layers {sorted(dual)} must index blocks 0..{depth - 1}")
        self.in_channels, self.patch_size, self.grid = in_channels, patch_size, image_size // patch_size
        patch_dim = patch_size * patch_size * in_channels
        self.patch_embed = nn.Linear(patch_dim, width)
        if pos_embed == "sd3":
            table = sd3_pos_embed(self.grid, width, pos_embed_max_size, pos_embed_base_size)
        else:
            table = sincos_pos_embed(self.grid, width)
        self.register_buffer("pos_embed", table, persistent=pos_embed == "sd3")
        self.time_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(
            [MMDiTBlock(width, heads, mlp_ratio, last=(i == depth - 1), qk_norm=qk_norm, dual_attention=i in dual)
             for i in range(depth)]
        )
        self.final = FinalLayer(width, patch_dim)
        init_adaln_zero(self)

    def forward(self, z: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        p = self.patch_size
        img = self.patch_embed(rearrange(z, "b c (h p) (w q) -> b (h w) (p q c)", p=p, q=p)) + self.pos_embed
        ctx = cond.tokens
        c = self.time_embed(t) + cond.pooled  # global vector driving every adaLN
        for block in self.blocks:
            img, ctx = block(img, ctx, cond.mask, c)
        out = self.final(img, c)
        return rearrange(out, "b (h w) (p q c) -> b c (h p) (w q)", h=self.grid, p=p, q=p)
