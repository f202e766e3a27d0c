"""Condition encoding shared by the peer systems (MM-DiT rectified flow and FlowAR).

The harness's condition — a class label and/or a text triple (states [B, L, Dc], mask [B, L] or
None, pooled [B, Dp] or None) — becomes condition tokens + one pooled vector in model width.

The unconditional branch of classifier-free guidance has two forms:
- the LEARNED null (default): what `drop` selects, and what training drops conditions to;
- a NEGATIVE condition given by the caller in the same form as `text`, typically the encoded empty
  prompt. SD3 (and the official STARFlow) build their unconditional branch this way, so a model
  imported from SD3 has no meaningful learned null and needs it. `guidance_pair` builds the
  [conditional; unconditional] batch either way, which is how every peer family takes `negative`.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F


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


    def dropped(self, batch: int, y: torch.Tensor | None, text, drop: torch.Tensor | None, negative=None,
                device: torch.device | None = None) -> Condition:
        """The condition with `drop` rows replaced by the learned null, or by `negative` (a text
        triple, batch `batch` or 1) when given: training for an empty-prompt unconditional branch."""
        if negative is None or drop is None:
            return self(batch, y, text, drop, device=device)
        if self.cond_dim == 0:
            raise ValueError("a negative condition is a text condition; this model has cond_dim=0")
        both = concat_conditions(self(batch, y, text, device=device),
                                 self(batch, None, expand_text(negative, batch), device=device))
        keep, neg = (Condition(*(t[rows] for t in both)) for rows in (slice(0, batch), slice(batch, None)))
        drop = drop.to(keep.mask.device)
        return Condition(torch.where(drop[:, None, None], neg.tokens, keep.tokens),
                         torch.where(drop[:, None], neg.mask, keep.mask),
                         torch.where(drop[:, None], neg.pooled, keep.pooled))

    def guidance_pair(self, n: int, y: torch.Tensor | None, text, negative=None,
                      device: torch.device | None = None) -> Condition:
        """Rows [0, n) the condition, rows [n, 2n) the unconditional branch: the learned null, or
        `negative` (a text triple like `text`, batch n or 1) encoded as a condition of its own.
        Rows of different token lengths are padded with masked-out tokens."""
        y2, text2 = repeat_condition(y, text)
        if negative is None:
            return self(2 * n, y2, text2, torch.arange(2 * n, device=device) >= n, device=device)
        if self.cond_dim == 0:
            raise ValueError("a negative condition is a text condition; this model has cond_dim=0")
        negative = expand_text(negative, n)
        return concat_conditions(self(n, y, text, device=device), self(n, None, negative, device=device))


def expand_text(text, n: int):
    """A text triple with batch 1 broadcast to batch n (an encoded empty prompt serves every row)."""
    if not isinstance(text, (tuple, list)) or len(text) != 3:
        raise ValueError("negative must be a tuple (states [B,L,D], mask [B,L] or None, pooled [B,Dp] or None)")
    states, mask, pooled = text
    if states.shape[0] == n:
        return tuple(text)
    if states.shape[0] != 1:
        raise ValueError(f"negative condition batch must be 1 or {n}, got {states.shape[0]}")
    return tuple(None if t is None else t.expand(n, *t.shape[1:]) for t in (states, mask, pooled))


def repeat_condition(y: torch.Tensor | None, text):
    """Stack a condition twice along the batch (rows [cond; uncond] for one CFG forward pass)."""
    y2 = None if y is None else torch.cat([y, y])
    if text is None:
        return y2, None
    states, mask, pooled = text
    return y2, (torch.cat([states, states]), None if mask is None else torch.cat([mask, mask]),
                None if pooled is None else torch.cat([pooled, pooled]))


def concat_conditions(a: Condition, b: Condition) -> Condition:
    """Stack two encoded conditions along the batch, right-padding the shorter token sequence with
    masked-out zeros (a masked key changes no attention output)."""
    length = max(a.tokens.shape[1], b.tokens.shape[1])

    def pad(c: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        extra = length - c.tokens.shape[1]
        return F.pad(c.tokens, (0, 0, 0, extra)), F.pad(c.mask, (0, extra), value=False)

    (ta, ma), (tb, mb) = pad(a), pad(b)
    pooled = torch.cat([a.pooled, b.pooled.to(a.pooled.dtype)])
    return Condition(torch.cat([ta, tb.to(ta.dtype)]), torch.cat([ma, mb]), pooled)


def condition_args(y, text, negative, cond):
    """The package's one ``starflow.flow.condition.Condition`` (``cond``, and ``negative`` when it is one)
    -> the (labels, text triple, negative triple) these encoders take. The keyword form passes through."""
    if cond is not None:
        if y is not None or text is not None:
            raise ValueError("give the condition either as cond or as y / text, not both")
        y, text = cond.labels, cond.text_triple()
    if negative is not None and hasattr(negative, "text_triple"):
        negative = negative.text_triple()
    return y, text, negative
