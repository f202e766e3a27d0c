"""The learning-rate schedule every trainer here uses: linear warm-up, then cosine decay to a floor."""
from __future__ import annotations

import math


def warmup_cosine(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Factor on the base learning rate at ``step`` (0-based): (step + 1) / warmup during the warm-up, then
    a cosine from 1 down to ``min_ratio`` at ``total`` steps (held there after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
