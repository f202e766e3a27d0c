"""One autoregressive affine flow step (the TARFlow block), DESIGN.md §2.

Forward (data -> noise), in the block's token order π:
    z_i = (x_i - mu_i(x_<i)) * exp(-alpha_i(x_<i)),   log|det dz/dx| = -sum_i sum_d alpha_{i,d}
A causal transformer produces (alpha_i, mu_i) for token i from the output at the position before it.
With a start token, token 0 is predicted from it; otherwise from the last prefix position, or without a
prefix token 0 passes through unchanged (alpha = mu = 0).

Sequence slots: the prefix (if any) fills slots 0..P-1; image slot j (absolute P + j) holds the start
token (j = 0) and then token j - 1, or without a start token token j.

The released model's switches (see ``FlowConfig``) change only how the raw output becomes
(mu, alpha): an optional soft clip c tanh(out / c), and sigma = softplus(a + 0.5413) instead of exp(a),
so alpha = log sigma stays the log-scale every sampler and the log-determinant read.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import math

import torch.nn.functional as F

from starflow.flow.condition import Condition, ConditionEmbedding
from starflow.nn.attention import KVCache, attention_mask
from starflow.nn.init import randn
from starflow.nn.norms import OffsetRMSNorm
from starflow.nn.rope import Rotary, rope_angles
from starflow.nn.transformer import TransformerLayer

INV_SOFTPLUS_1 = math.log(math.e - 1)  # softplus(INV_SOFTPLUS_1) = 1: a zero output is the identity


def log_softplus(x: torch.Tensor) -> torch.Tensor:
    """log(softplus(x)) without underflow: softplus(x) ~ exp(x) far below zero."""
    return torch.where(x < -20, x, F.softplus(x).log())


class Context:
    """What one call of a block needs besides the tokens: the embedded condition (a prefix of tokens, or
    a vector added to every token) and the token layout (the block's order over L tokens, and each
    token's position id in the learned position table: a smaller or non-square grid uses a sub-grid
    of the table, which is how aspect-ratio buckets share one model)."""

    def __init__(self, perm, pos_perm, prefix=None, prefix_valid=None, add=None, rope: Rotary | None = None):
        self.prefix, self.prefix_valid, self.add = prefix, prefix_valid, add
        self.perm, self.pos_perm = perm, pos_perm
        self.inv_perm = torch.argsort(perm)
        self.rope = rope

    @property
    def num_tokens(self) -> int:
        return self.perm.shape[0]

    @property
    def prefix_len(self) -> int:
        return 0 if self.prefix is None else self.prefix.shape[1]

    def key_valid(self, num_tokens: int) -> torch.Tensor | None:
        if self.prefix_valid is None:
            return None
        B = self.prefix_valid.shape[0]
        ones = self.prefix_valid.new_ones(B, num_tokens)
        return torch.cat([self.prefix_valid, ones], dim=1)


class FlowBlock(nn.Module):
    def __init__(self, token_dim: int, num_tokens: int, width: int, num_layers: int, head_dim: int,
                 mlp_ratio: float, reverse_order: bool, norm: str = "layernorm", qk_norm: bool = False,
                 affine: bool = True, num_classes: int = 0, cond_dim: int = 0, cond_mode: str = "prefix",
                 rope: bool = False, rope_prefix_axis: bool = False, start_token: bool = False, scale: str = "exp",
                 soft_clip: float = 0.0, final_norm: bool = False, num_kv_heads: int | None = None,
                 swiglu: bool = False, learned_null: bool = True, source_prefix: bool = False,
                 text_positions: int = 0):
        super().__init__()
        self.token_dim, self.num_tokens, self.affine = token_dim, num_tokens, affine
        self.cond_mode = cond_mode
        self.head_dim, self.rope_prefix_axis = head_dim, rope_prefix_axis
        self.start_token, self.scale, self.soft_clip = start_token, scale, soft_clip
        self.proj_in = nn.Linear(token_dim, width)
        if rope:
            self.pos_embed = None
        else:
            self.pos_embed = nn.Parameter(randn(num_tokens, width, std=1e-2))
        if start_token:
            self.sos_embed = nn.Parameter(randn(1, 1, token_dim))
        self.condition = (ConditionEmbedding(width, num_classes, cond_dim, learned_null, text_positions)
                          if (num_classes or cond_dim) else None)
        self.layers = nn.ModuleList(TransformerLayer(width, head_dim, mlp_ratio, norm, qk_norm, num_kv_heads, swiglu)
                                    for _ in range(num_layers))
        self.final_norm = OffsetRMSNorm(width) if final_norm else None
        self.proj_out = nn.Linear(width, 2 * token_dim if affine else token_dim)
        nn.init.zeros_(self.proj_out.weight)  # every block starts as the identity map
        nn.init.zeros_(self.proj_out.bias)
        self.reverse_order = reverse_order
        self.gradient_checkpointing = False  # set by the trainer: recompute each layer in backward
        self.source_prefix = source_prefix
        if source_prefix:  # edit models: the source image's tokens, projected and placed, lead the prefix
            self.source_proj = nn.Linear(token_dim, width)
            self.source_pos = nn.Parameter(randn(num_tokens, width, std=1e-2))

    @property
    def conditional(self) -> bool:
        return self.condition is not None

    # ---- condition -------------------------------------------------------------------------
    def order(self, num_tokens: int, device) -> torch.Tensor:
        """The block's permutation π of token indices: identity, or reversed for odd blocks."""
        perm = torch.arange(num_tokens, device=device)
        return perm.flip(0) if self.reverse_order else perm

    def context(self, cond: Condition | None, batch: int, device, pos: torch.Tensor | None = None) -> Context:
        """``pos``: position ids of the L tokens in canonical order (default: the full grid 0..L-1)."""
        if pos is None:
            pos = torch.arange(self.num_tokens, device=device)
        perm = self.order(pos.shape[0], device)
        layout = dict(perm=perm, pos_perm=pos[perm])
        if self.condition is None:
            return Context(**layout, rope=self._rope(pos, 0))
        tokens, valid = self.condition(cond, batch, device)
        if self.cond_mode == "add":
            return Context(**layout, add=tokens[:, 0], rope=self._rope(pos, 0))
        rope = self._rope(pos, tokens.shape[1])
        if self.source_prefix:
            tokens, valid = self._with_source(cond, tokens, valid)
        return Context(**layout, prefix=tokens, prefix_valid=valid, rope=rope)

    def _with_source(self, cond: Condition | None, tokens: torch.Tensor, valid: torch.Tensor | None):
        """Prefix = [projected source tokens + their positions ; condition tokens] (the source is never dropped)."""
        src = getattr(cond, "source", None)
        if src is None:
            raise ValueError("an edit model needs the source image (source=...)")
        s = self.source_proj(src.to(self.source_proj.weight.dtype)) + self.source_pos
        if valid is not None:
            valid = torch.cat([valid.new_ones(valid.shape[0], s.shape[1]), valid], dim=1)
        return torch.cat([s.to(tokens.dtype), tokens], dim=1), valid

    def _rope(self, pos: torch.Tensor, prefix_len: int) -> Rotary | None:
        """Rotary tables for the slots: the prefix, then the grid that the position ids ``pos`` (row-major
        ids in the model's square table) cover."""
        if self.pos_embed is not None:
            return None
        side = math.isqrt(self.num_tokens)
        rows, cols = pos // side, pos % side
        grid = (int(rows.max()) + 1, int(cols.max()) + 1)
        if grid[0] * grid[1] != pos.shape[0]:
            raise ValueError(f"rotary positions need a full grid of tokens, got {pos.shape[0]} ids")
        return Rotary(rope_angles(self.head_dim, grid, side, prefix_len, self.rope_prefix_axis), pos.device)

    # ---- shared pieces ---------------------------------------------------------------------
    def _embed(self, x_perm: torch.Tensor, slot: int, ctx: Context) -> torch.Tensor:
        """Embeddings of inputs (permuted tokens or the start token) for image slots slot..slot+T-1."""
        T = x_perm.shape[1]
        h = self.proj_in(x_perm.to(self.proj_in.weight.dtype))  # flow values are >= fp32; weights may be bf16
        if self.pos_embed is not None:
            h = h + self.pos_embed[ctx.pos_perm[slot:slot + T]]
        if ctx.add is not None:
            h = h + ctx.add[:, None]
        return h

    def _start(self, batch: int, ctx: Context) -> torch.Tensor:
        """The start token's embedding [B, 1, W] (image slot 0)."""
        return self._embed(self.sos_embed.expand(batch, 1, -1), 0, ctx)

    def _run(self, h, start_pos: int, ctx: Context, caches: list[KVCache] | None):
        mask = attention_mask(start_pos, h.shape[1], ctx.key_valid(ctx.num_tokens + self.start_token), h.device)
        rope = {} if ctx.rope is None else {"rope": ctx.rope}  # keyword only when used: layers stay swappable
        if self.gradient_checkpointing and caches is None and self.training and torch.is_grad_enabled():
            for layer in self.layers:
                h = checkpoint(layer, h, mask, None, start_pos, ctx.rope, use_reentrant=False)
        else:
            for i, layer in enumerate(self.layers):
                h = layer(h, mask, None if caches is None else caches[i], start_pos, **rope)
        if self.final_norm is not None:
            h = self.final_norm(h)
        out = self.proj_out(h)
        out = out if out.dtype == torch.float64 else out.float()  # flow arithmetic in >= fp32
        if self.soft_clip > 0:
            out = self.soft_clip * torch.tanh(out / self.soft_clip)
        return out

    def split(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw output -> (mu, alpha = log sigma); the first half is the scale parameter, as in the
        official TARFlow/STARFlow code."""
        if not self.affine:
            return out, torch.zeros_like(out)
        a, mu = out.chunk(2, dim=-1)
        if self.scale == "softplus":
            return mu, log_softplus(a + INV_SOFTPLUS_1)
        return mu, a

    def zero_output(self, batch: int, device) -> torch.Tensor:
        width = 2 * self.token_dim if self.affine else self.token_dim
        return torch.zeros(batch, 1, width, device=device)

    # ---- training / likelihood: all positions in parallel ----------------------------------
    def predict(self, x_perm: torch.Tensor, ctx: Context) -> torch.Tensor:
        """Raw (alpha, mu) outputs for every permuted token of x_perm [B, L, D], teacher-forced."""
        B = x_perm.shape[0]
        P = ctx.prefix_len
        if self.start_token:  # slots: [prefix], start, x_0 .. x_{L-2}; slot j predicts token j
            h = torch.cat([self._start(B, ctx), self._embed(x_perm[:, :-1], 1, ctx)], dim=1)
            if P:
                h = torch.cat([ctx.prefix.to(h.dtype), h], dim=1)
            return self._run(h, 0, ctx, None)[:, P:]
        h = self._embed(x_perm, 0, ctx)
        if P:
            h = torch.cat([ctx.prefix.to(h.dtype), h], dim=1)
        out = self._run(h, 0, ctx, None)
        if P:
            return out[:, P - 1:P - 1 + x_perm.shape[1]]
        return torch.cat([self.zero_output(B, x_perm.device), out[:, :-1]], dim=1)

    def forward(self, x: torch.Tensor, cond: Condition | None = None, pos: torch.Tensor | None = None,
                per_dim: bool = False):
        """x [B, L, D] in canonical token order -> (z [B, L, D] canonical order, logdet [B]; with
        ``per_dim``, each dimension's log|dz/dx| [B, L, D] instead)."""
        ctx = self.context(cond, x.shape[0], x.device, pos)
        x_perm = x[:, ctx.perm]
        mu, alpha = self.split(self.predict(x_perm, ctx))
        z = (x_perm - mu) * torch.exp(-alpha)
        return z[:, ctx.inv_perm], -alpha[:, ctx.inv_perm] if per_dim else -alpha.sum(dim=(1, 2))

    # ---- sampling: incremental decoding with a key/value cache -----------------------------
    def new_caches(self, ctx: Context) -> list[KVCache]:
        return [KVCache(ctx.prefix_len + ctx.num_tokens + self.start_token) for _ in self.layers]

    def prefill(self, ctx: Context, caches: list[KVCache], batch: int, device) -> torch.Tensor:
        """Consume the prefix (and the start token); return the raw output predicting token 0, [B, 1, out]."""
        if self.start_token:
            h = self._start(batch, ctx)
            if ctx.prefix_len:
                h = torch.cat([ctx.prefix.to(h.dtype), h], dim=1)
            return self._run(h, 0, ctx, caches)[:, -1:]
        if not ctx.prefix_len:
            return self.zero_output(batch, device)
        return self._run(ctx.prefix, 0, ctx, caches)[:, -1:]

    def extend(self, x_perm_chunk: torch.Tensor, start: int, ctx: Context, caches: list[KVCache]) -> torch.Tensor:
        """Feed permuted tokens start..start+T-1; return raw outputs predicting tokens start+1..start+T.
        Slots past ``start`` in the caches are overwritten, so feeding again from ``start`` rewinds."""
        slot = start + self.start_token
        h = self._embed(x_perm_chunk, slot, ctx)
        return self._run(h, ctx.prefix_len + slot, ctx, caches)
