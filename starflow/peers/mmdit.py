"""MM-DiT, the transformer of SD3 (Esser et al. 2024), plus the small pieces both peer systems share.

An MM-DiT block carries two token streams: image patches and condition tokens (class tokens or
text-encoder states). Each stream has its OWN weights — adaLN modulation, norms, QKV, QK-RMSNorm,
output projection, MLP — because the two modalities have different statistics. The streams meet in
ONE attention over their concatenation, so every image token can read every condition token and
vice versa. Global conditioning (timestep embedding + a pooled condition vector) enters through
adaLN-Zero: per-block shift/scale/gate regressed from that vector, zero-initialised so every block
starts as the identity.

Shared with FlowAR (flowar.py): `RMSNorm`, `modulate`, `TimestepEmbedder`, `sincos_pos_embed`,
`FeedForward`, `Condition` / `ConditionEncoder`.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

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


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


# --------------------------------------------------------------------------------------------
# Conditioning: class label or text states -> condition tokens + pooled vector
# --------------------------------------------------------------------------------------------


class Condition(NamedTuple):
    tokens: torch.Tensor  # [B, Lc, D] condition tokens in model width
    mask: torch.Tensor  # [B, Lc] bool, True = a real token (attend to it)
    pooled: torch.Tensor  # [B, D] global condition vector (added to the timestep embedding)


class ConditionEncoder(nn.Module):
    """Turns the harness's condition (class label and/or (states, mask, pooled) text triple) into
    condition tokens + a pooled vector of the model's width.

    Dropping a condition (classifier-free guidance) replaces it with a LEARNED null: the extra
    last row of the class tables, or a single learned null text token (the rest masked out) plus a
    learned null pooled vector. A model with no condition at all gets one learned constant token,
    so the joint attention never sees an empty condition stream.
    """

    def __init__(self, width: int, num_classes: int = 0, cond_dim: int = 0, pooled_dim: int = 0,
                 num_class_tokens: int = 1):
        super().__init__()
        self.width, self.num_classes, self.cond_dim, self.pooled_dim = width, num_classes, cond_dim, pooled_dim
        self.num_class_tokens = num_class_tokens
        if num_classes > 0:
            # Row `num_classes` is the null class.
            self.class_tokens = nn.Embedding(num_classes + 1, num_class_tokens * width)
            self.class_pooled = nn.Embedding(num_classes + 1, width)
            nn.init.normal_(self.class_tokens.weight, std=0.02)
            nn.init.normal_(self.class_pooled.weight, std=0.02)
        if cond_dim > 0:
            self.text_proj = nn.Linear(cond_dim, width)
            # Without a separate pooled vector we pool the states ourselves (masked mean).
            pooled_in = pooled_dim if pooled_dim > 0 else cond_dim
            self.text_pooled = nn.Sequential(nn.Linear(pooled_in, width), nn.SiLU(), nn.Linear(width, width))
            self.null_text = nn.Parameter(torch.randn(width) * 0.02)
            self.null_pooled = nn.Parameter(torch.randn(width) * 0.02)
        if not self.conditional:
            self.uncond_token = nn.Parameter(torch.randn(width) * 0.02)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.cond_dim > 0

    def check(self, batch: int, y: torch.Tensor | None, text) -> None:
        """Clear errors for conditions the model cannot take."""
        if y is not None:
            if self.num_classes == 0:
                raise ValueError("class labels y given, but the model has num_classes=0 (not class-conditional)")
            if y.dtype not in (torch.int64, torch.int32) or y.shape != (batch,):
                raise ValueError(f"y must be an integer tensor of shape [{batch}], got {tuple(y.shape)} {y.dtype}")
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(f"class labels must lie in [0, {self.num_classes}), got range "
                                 f"[{int(y.min())}, {int(y.max())}]")
        if text is not None:
            if self.cond_dim == 0:
                raise ValueError("text condition given, but the model has cond_dim=0 (not text-conditional)")
            if not isinstance(text, (tuple, list)) or len(text) != 3:
                raise ValueError("text must be a tuple (states [B,L,D], mask [B,L] bool or None, pooled [B,Dp] or None)")
            states, mask, pooled = text
            if states.ndim != 3 or states.shape[0] != batch or states.shape[2] != self.cond_dim:
                raise ValueError(f"text states must be [{batch}, L, {self.cond_dim}], got {tuple(states.shape)}")
            if mask is not None:
                if mask.shape != states.shape[:2]:
                    raise ValueError(f"text mask must be {tuple(states.shape[:2])}, got {tuple(mask.shape)}")
                if not bool(mask.bool().any(dim=1).all()):
                    raise ValueError("every text mask row needs at least one True (real) token")
            if self.pooled_dim > 0:
                if pooled is None or pooled.shape != (batch, self.pooled_dim):
                    got = None if pooled is None else tuple(pooled.shape)
                    raise ValueError(f"pooled text vector must be [{batch}, {self.pooled_dim}], got {got}")

    def forward(self, batch: int, y: torch.Tensor | None = None, text=None, drop: torch.Tensor | None = None,
                device: torch.device | None = None) -> Condition:
        """drop: bool [B], True = replace this row's condition by the learned null."""
        self.check(batch, y, text)
        device = device if device is not None else next(self.parameters()).device
        if drop is None:
            drop = torch.zeros(batch, dtype=torch.bool, device=device)
        tokens, masks, pooled = [], [], torch.zeros(batch, self.width, device=device)

        if self.num_classes > 0:
            # No label (unconditional request) or dropped label -> the null row.
            labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            if y is not None:
                labels = torch.where(drop, labels, y.to(device).long())
            tokens.append(self.class_tokens(labels).view(batch, self.num_class_tokens, self.width))
            masks.append(torch.ones(batch, self.num_class_tokens, dtype=torch.bool, device=device))
            pooled = pooled + self.class_pooled(labels)

        if self.cond_dim > 0:
            if text is None:  # unconditional request: a one-token null sequence
                t_tok = self.null_text.expand(batch, 1, -1)
                t_mask = torch.ones(batch, 1, dtype=torch.bool, device=device)
                t_pool = self.null_pooled.expand(batch, -1)
            else:
                states, mask, pool_in = text
                states = states.to(device)
                mask = torch.ones(states.shape[:2], dtype=torch.bool, device=device) if mask is None else mask.to(device).bool()
                if self.pooled_dim == 0:
                    m = mask.unsqueeze(-1).to(states.dtype)
                    pool_in = (states * m).sum(1) / m.sum(1)
                t_tok = self.text_proj(states)
                t_pool = self.text_pooled(pool_in.to(device))
                # Dropped rows: null token in slot 0, every other slot masked out.
                null_seq = torch.zeros_like(t_tok)
                null_seq[:, 0] = self.null_text.to(t_tok.dtype)
                null_mask = torch.zeros_like(mask)
                null_mask[:, 0] = True
                t_tok = torch.where(drop[:, None, None], null_seq, t_tok)
                t_mask = torch.where(drop[:, None], null_mask, mask)
                t_pool = torch.where(drop[:, None], self.null_pooled.to(t_pool.dtype).expand_as(t_pool), t_pool)
            tokens.append(t_tok)
            masks.append(t_mask)
            pooled = pooled + t_pool

        if not self.conditional:
            tokens.append(self.uncond_token.expand(batch, 1, -1))
            masks.append(torch.ones(batch, 1, dtype=torch.bool, device=device))

        dtype = tokens[0].dtype
        return Condition(torch.cat([t.to(dtype) for t in tokens], dim=1), torch.cat(masks, dim=1), pooled)


# --------------------------------------------------------------------------------------------
# MM-DiT
# --------------------------------------------------------------------------------------------


class StreamWeights(nn.Module):
    """Everything one modality owns inside an MM-DiT block. The image stream and the condition
    stream each get an instance; they share no Parameter.

    `pre_only`: the condition stream of the LAST block only contributes keys/values (its outputs
    are never read again), so it keeps just the pre-attention half — no dead parameters.
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float, pre_only: bool = False):
        super().__init__()
        self.heads, self.pre_only = heads, pre_only
        head_dim = width // heads
        # adaLN-Zero: (shift, scale) for attention input, plus (gate, shift, scale, gate) for the rest.
        self.modulation = nn.Linear(width, (2 if pre_only else 6) * width)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = RMSNorm(head_dim)  # QK-norm keeps attention logits bounded as training goes on
        self.k_norm = RMSNorm(head_dim)
        if not pre_only:
            self.proj = nn.Linear(width, width)
            self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
            self.mlp = FeedForward(width, mlp_ratio)

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x: [B, L, D], c: [B, D]. Returns q, k, v as [B, H, L, hd] and the modulation chunks."""
        mod = self.modulation(F.silu(c)).unsqueeze(1).chunk(2 if self.pre_only else 6, dim=-1)
        h = modulate(self.norm1(x), mod[0], mod[1])
        q, k, v = rearrange(self.qkv(h), "b l (three h d) -> three b h l d", three=3, h=self.heads)
        return self.q_norm(q), self.k_norm(k), v, mod

    def post_attention(self, x: torch.Tensor, attn: torch.Tensor, mod) -> torch.Tensor:
        _, _, gate_attn, shift_mlp, scale_mlp, gate_mlp = mod
        x = x + gate_attn * self.proj(rearrange(attn, "b h l d -> b l (h d)"))
        return x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class MMDiTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, last: bool = False):
        super().__init__()
        self.image = StreamWeights(width, heads, mlp_ratio)
        self.context = StreamWeights(width, heads, mlp_ratio, pre_only=last)

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
    """Velocity network v(z_t, t, condition) for images [B, C, H, W]."""

    def __init__(self, in_channels: int, image_size: int, patch_size: int, width: int, depth: int, heads: int,
                 mlp_ratio: float = 4.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not divisible by patch_size {patch_size}")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.in_channels, self.patch_size, self.grid = in_channels, patch_size, image_size // patch_size
        patch_dim = patch_size * patch_size * in_channels
        self.patch_embed = nn.Linear(patch_dim, width)
        self.register_buffer("pos_embed", sincos_pos_embed(self.grid, width), persistent=False)
        self.time_embed = TimestepEmbedder(width)
        self.blocks = nn.ModuleList(
            [MMDiTBlock(width, heads, mlp_ratio, last=(i == depth - 1)) for i in range(depth)]
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
