"""The one condition every model family reads, and how a flow block embeds it.

``Condition`` is built once (by the pipeline from prompts / labels, by the trainer from a batch) and
handed to any family: a flow reads labels or text states + mask (and the source prefix of an edit
model), the peer systems (MM-DiT, FlowAR) also read the pooled text vector. Each family uses the fields
it needs and ignores the rest.

A row whose ``drop`` flag is set reads the learned null condition instead; that is both the
condition dropout of training and the unconditional branch of guidance. A model built without a
learned null (``learned_null=False``, the released STARFlow model) has no such row: its unconditional
branch is a condition like any other (e.g. the encoded empty prompt), given explicitly.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn

from starflow.nn.init import randn


@dataclass
class Condition:
    labels: torch.Tensor | None = None      # [B] int64
    text: torch.Tensor | None = None        # [B, Lt, Dt] encoder states
    text_mask: torch.Tensor | None = None   # [B, Lt] bool, True = real token
    drop: torch.Tensor | None = None        # [B] bool, True = use the null condition
    pooled: torch.Tensor | None = None      # [B, Dp] pooled text vector (the peer systems read it)
    # edit models: the source image [B, C, H, W] in the model's space, or its flow tokens [B, L, D] once the
    # model has read it; a deep-block prefix that is never dropped
    source: torch.Tensor | None = None

    @classmethod
    def from_args(cls, y=None, text=None) -> "Condition | None":
        """The legacy keyword form -> a Condition: ``y`` labels, ``text`` a tensor of states or a tuple
        (states, mask) / (states, mask, pooled). None when neither is given."""
        if isinstance(text, Condition):
            return text
        if y is None and text is None:
            return None
        states = mask = pooled = None
        if text is not None:
            if isinstance(text, (tuple, list)):
                states, mask = text[0], text[1] if len(text) > 1 else None
                pooled = text[2] if len(text) > 2 else None
            else:
                states = text
        return cls(labels=None if y is None else torch.as_tensor(y), text=states, text_mask=mask, pooled=pooled)

    def text_triple(self):
        """(states, mask, pooled) as the peer systems' condition encoders take it; None without text."""
        return None if self.text is None else (self.text, self.text_mask, self.pooled)

    def with_drop(self, drop: torch.Tensor | None) -> "Condition":
        """Rows where ``drop`` is True also read the null condition (condition dropout)."""
        if drop is None:
            return self
        return replace(self, drop=self.drop_mask() | drop.to(device=self.drop_mask().device, dtype=torch.bool))

    @property
    def batch_size(self) -> int | None:
        for t in (self.labels, self.text, self.drop):
            if t is not None:
                return t.shape[0]
        return None

    def null(self) -> "Condition":
        """The same batch with every row replaced by the null condition (guidance's unconditional half);
        the source prefix of an edit model is kept."""
        B = self.batch_size
        device = next(t.device for t in (self.labels, self.text, self.drop) if t is not None)
        return replace(self, drop=torch.ones(B, dtype=torch.bool, device=device))

    def cat(self, other: "Condition") -> "Condition":
        """Rows of self then rows of other. Text of different lengths is padded with hidden tokens."""
        def join(a, b):
            return None if a is None else torch.cat([a, b])

        text = mask = None
        if self.text is not None:
            a, b = self.text, other.text
            L = max(a.shape[1], b.shape[1])
            text = torch.cat([_pad_tokens(a, L), _pad_tokens(b, L)])
            if self.text_mask is not None or other.text_mask is not None or a.shape[1] != b.shape[1]:
                mask = torch.cat([_pad_tokens(_mask_or_ones(self), L), _pad_tokens(_mask_or_ones(other), L)])
        pooled = None if self.pooled is None or other.pooled is None else torch.cat([self.pooled, other.pooled])
        source = None if self.source is None else torch.cat([self.source, other.source])
        return Condition(join(self.labels, other.labels), text, mask, torch.cat([self.drop_mask(), other.drop_mask()]),
                         pooled, source)

    def rows(self, idx) -> "Condition":
        def pick(t):
            return None if t is None else t[idx]

        return Condition(pick(self.labels), pick(self.text), pick(self.text_mask), pick(self.drop), pick(self.pooled),
                         pick(self.source))

    def drop_mask(self) -> torch.Tensor:
        if self.drop is not None:
            return self.drop
        ref = self.labels if self.labels is not None else self.text
        return torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)

    def to(self, device) -> "Condition":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Condition(mv(self.labels), mv(self.text), mv(self.text_mask), mv(self.drop), mv(self.pooled),
                         mv(self.source))


def _mask_or_ones(cond: Condition) -> torch.Tensor:
    if cond.text_mask is not None:
        return cond.text_mask.bool()
    return torch.ones(cond.text.shape[:2], dtype=torch.bool, device=cond.text.device)


def _pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 with zeros (False for masks) up to ``length``."""
    if t.shape[1] == length:
        return t
    pad = t.new_zeros((t.shape[0], length - t.shape[1], *t.shape[2:]))
    return torch.cat([t, pad], dim=1)


class ConditionEmbedding(nn.Module):
    """Class labels -> one token; text states -> a projected token sequence. Null has its own weights."""

    def __init__(self, width: int, num_classes: int = 0, cond_dim: int = 0, learned_null: bool = True,
                 text_positions: int = 0):
        """``text_positions`` > 0: a learned position table of that many rows added to the projected text
        tokens, zero at init (so a fine-tune from a model without it starts as the same function)."""
        super().__init__()
        self.num_classes = num_classes
        self.learned_null = learned_null
        if num_classes:
            # Row ``num_classes`` is the learned null class.
            self.class_embed = nn.Parameter(randn(num_classes + learned_null, width, std=0.02))
        if cond_dim:
            self.text_proj = nn.Linear(cond_dim, width)
            if text_positions:
                self.text_pos = nn.Parameter(torch.zeros(text_positions, width))
            if learned_null:
                self.null_text = nn.Parameter(randn(width, std=0.02))

    def forward(self, cond: Condition | None, batch: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (tokens [B, P, W], key_valid [B, P] bool or None)."""
        drop = cond.drop_mask() if cond is not None and cond.batch_size else torch.ones(batch, dtype=torch.bool, device=device)
        if not self.learned_null:
            if bool(drop.any()):
                raise ValueError("this model has no learned null condition: give the negative (unconditional) "
                                 "condition explicitly, e.g. the encoded empty prompt")
            if self.num_classes:
                return self.class_embed[cond.labels][:, None], None
            return self._text_tokens(cond.text.to(self.text_proj.weight.dtype)), cond.text_mask
        if self.num_classes:
            labels = cond.labels if cond is not None and cond.labels is not None else None
            if labels is None:
                labels = torch.full((batch,), self.num_classes, device=device)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            return self.class_embed[labels][:, None], None
        if cond is None or cond.text is None:
            tokens = self.null_text.expand(batch, 1, -1)
            return tokens, None
        tokens = self._text_tokens(cond.text)
        valid = cond.text_mask if cond.text_mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        # A dropped row becomes [null, pad, pad, ...]: one valid token, the null.
        null_row = torch.zeros_like(tokens)
        null_row[:, 0] = self.null_text.to(tokens.dtype)
        tokens = torch.where(drop[:, None, None], null_row, tokens)
        first_only = torch.zeros_like(valid)
        first_only[:, 0] = True
        valid = torch.where(drop[:, None], first_only, valid)
        return tokens, valid

    def _text_tokens(self, states: torch.Tensor) -> torch.Tensor:
        tokens = self.text_proj(states)
        if hasattr(self, "text_pos"):
            if tokens.shape[1] > self.text_pos.shape[0]:
                raise ValueError(f"{tokens.shape[1]} text tokens, but the model has positions for {self.text_pos.shape[0]} "
                                 "(max_text_tokens)")
            tokens = tokens + self.text_pos[:tokens.shape[1]].to(tokens.dtype)
        return tokens
