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

Shared with FlowAR (flowar.py): `RMSNorm`, `modulate`, `TimestepEmbedder`, `sincos_pos_embed`,
`FeedForward`; `Condition` / `ConditionEncoder` live in conditioning.py (re-exported here).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from starflow.peers.conditioning import Condition, ConditionEncoder  # noqa: F401  (re-exported)

# --------------------------------------------------------------------------------------------
# Small shared pieces
# --------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMS normalisation with a learned gain. Computed in float32: under bf16 autocast the mean of
    squares of a wide vector loses too many bits to be a reliable normaliser."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift. `scale` starts at 0, so an untrained block sees plain LN."""
    return x * (1 + scale) + shift


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


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# --------------------------------------------------------------------------------------------
# MM-DiT
# --------------------------------------------------------------------------------------------


def qk_norm_layer(head_dim: int, enabled: bool) -> nn.Module:
    # QK-norm keeps attention logits bounded as training goes on; SD3-medium was trained without it.
    return RMSNorm(head_dim) if enabled else nn.Identity()


class ImageSelfAttention(nn.Module):
    """SD3.5-medium's second attention in an image stream: image tokens only, its own QKV, QK-norm
    and output projection, fed by the same LayerNorm under its own (shift, scale)."""

    def __init__(self, width: int, heads: int, qk_norm: bool = True):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = qk_norm_layer(width // heads, qk_norm), qk_norm_layer(width // heads, qk_norm)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(rearrange(out, "b h l d -> b l (h d)"))


class StreamWeights(nn.Module):
    """Everything one modality owns inside an MM-DiT block. The image stream and the condition
    stream each get an instance; they share no Parameter.

    `pre_only`: the condition stream of the LAST block only contributes keys/values (its outputs
    are never read again), so it keeps just the pre-attention half — no dead parameters.
    `dual_attention` (image stream only): a second, image-only attention (ImageSelfAttention) with
    three more modulation chunks (shift, scale, gate), added after the joint attention's residual.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, pre_only: bool = False, qk_norm: bool = True,
                 dual_attention: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        head_dim = width // heads
        # adaLN-Zero: (shift, scale) for attention input, plus (gate, shift, scale, gate) for the rest,
        # plus (shift, scale, gate) of the second attention.
        self.chunks = 2 if pre_only else (9 if dual_attention else 6)
        self.modulation = nn.Linear(width, self.chunks * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm, self.k_norm = qk_norm_layer(head_dim, qk_norm), qk_norm_layer(head_dim, qk_norm)
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = FeedForward(width, mlp_ratio)
        self.attn2 = ImageSelfAttention(width, heads, qk_norm) if dual_attention and not pre_only else None

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x: [B, L, D], c: [B, D]. Returns q, k, v as [B, H, L, hd] and the modulation chunks."""
        mod = self.modulation(F.silu(c)).unsqueeze(1).chunk(self.chunks, dim=-1)
        h = modulate(self.norm1(x), mod[0], mod[1])
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        out = x + gate_attn * self.proj(rearrange(attn, "b h l d -> b l (h d)"))
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
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
        out_c, out_i = out.split([ctx.shape[1], img.shape[1]], dim=2)
        img = self.image.post_attention(img, out_i, mod_i)
        ctx = None if self.context.pre_only else self.context.post_attention(ctx, out_c, mod_c)
        return img, ctx


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + LayerNorm + linear to patch pixels; zero-initialised, so the
    untrained network predicts velocity 0."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
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
