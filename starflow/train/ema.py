"""Exponential moving average of weights, via PyTorch's own AveragedModel."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def warmup_decay(decay: float, n_averaged: int, warmup: bool = True) -> float:
    """The decay of the update that follows ``n_averaged`` updates: with ``warmup``, min(decay, (1 + n) /
    (10 + n)), the warm-up of diffusers' EMAModel; without, ``decay``. Without the warm-up a run shorter than
    ~1 / (1 - decay) steps exports mostly its initialisation (0.999^300 = 0.74 of a 300-step run's average
    is the starting weights). The one rule for the plain and the sharded (FSDP) update."""
    return min(decay, (1 + n_averaged) / (10 + n_averaged)) if warmup else decay


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    def average(ema_params, params, num_averaged):
        get_ema_multi_avg_fn(warmup_decay(decay, int(num_averaged), warmup))(ema_params, params, num_averaged)
    ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    ema.requires_grad_(False)
    return ema
