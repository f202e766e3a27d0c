"""What a conditional flow block reads: class labels or text-encoder states, and how they are embedded.

A row whose ``drop`` flag is set reads the learned null condition instead; that is both the
condition dropout of training and the unconditional branch of guidance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass
class Condition:
    labels: torch.Tensor | None = None      # [B] int64
    text: torch.Tensor | None = None        # [B, Lt, Dt] encoder states
    text_mask: torch.Tensor | None = None   # [B, Lt] bool, True = real token
    drop: torch.Tensor | None = None        # [B] bool, True = use the null condition

    @property
    def batch_size(self) -> int | None:
        for t in (self.labels, self.text, self.drop):
            if t is not None:
                return t.shape[0]
        return None

    def null(self) -> "Condition":
        """The same batch with every row replaced by the null condition (guidance's unconditional half)."""
        B = self.batch_size
        device = next(t.device for t in (self.labels, self.text, self.drop) if t is not None)
        return Condition(self.labels, self.text, self.text_mask, torch.ones(B, dtype=torch.bool, device=device))

    def cat(self, other: "Condition") -> "Condition":
        def join(a, b):
            return None if a is None else torch.cat([a, b])

        return Condition(join(self.labels, other.labels), join(self.text, other.text),
                         join(self.text_mask, other.text_mask), torch.cat([self.drop_mask(), other.drop_mask()]))

    def drop_mask(self) -> torch.Tensor:
        if self.drop is not None:
            return self.drop
        ref = self.labels if self.labels is not None else self.text
        return torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)

    def to(self, device) -> "Condition":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Condition(mv(self.labels), mv(self.text), mv(self.text_mask), mv(self.drop))


class ConditionEmbedding(nn.Module):
    """Class labels -> one token; text states -> a projected token sequence. Null has its own weights."""

    def __init__(self, width: int, num_classes: int = 0, cond_dim: int = 0):
        super().__init__()
        self.num_classes = num_classes
        if num_classes:
            # Row ``num_classes`` is the learned null class.
            self.class_embed = nn.Parameter(torch.randn(num_classes + 1, width) * 0.02)
        if cond_dim:
            self.text_proj = nn.Linear(cond_dim, width)
            self.null_text = nn.Parameter(torch.randn(width) * 0.02)

    def forward(self, cond: Condition | None, batch: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Return (tokens [B, P, W], key_valid [B, P] bool or None)."""
        drop = cond.drop_mask() if cond is not None and cond.batch_size else torch.ones(batch, dtype=torch.bool, device=device)
        if self.num_classes:
            labels = cond.labels if cond is not None and cond.labels is not None else None
            if labels is None:
                labels = torch.full((batch,), self.num_classes, device=device)
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
            return self.class_embed[labels][:, None], None
        if cond is None or cond.text is None:
            tokens = self.null_text.expand(batch, 1, -1)
            return tokens, None
        tokens = self.text_proj(cond.text)
        valid = cond.text_mask if cond.text_mask is not None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=device)
        # A dropped row becomes [null, pad, pad, ...]: one valid token, the null.
        null_row = torch.zeros_like(tokens)
        null_row[:, 0] = self.null_text.to(tokens.dtype)
        tokens = torch.where(drop[:, None, None], null_row, tokens)
        first_only = torch.zeros_like(valid)
        first_only[:, 0] = True
        valid = torch.where(drop[:, None], first_only, valid)
        return tokens, valid
