"""Exponential moving average of weights, via PyTorch's own AveragedModel."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def warmup_decay(decay: float, n_averaged: int) -> float:
    """The decay of the update that follows ``n_averaged`` updates: min(decay, (1 + n) / (10 + n)), the
    warm-up of diffusers' EMAModel. Without it a run shorter than ~1 / (1 - decay) steps exports mostly
    its initialisation (0.999^300 = 0.74 of a 300-step run's average is the starting weights)."""
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def make_ema(model: torch.nn.Module, decay: float, warmup: bool = True) -> AveragedModel:
    if warmup:
        def average(ema_params, params, num_averaged):
            get_ema_multi_avg_fn(warmup_decay(decay, int(num_averaged)))(ema_params, params, num_averaged)
    else:
        average = get_ema_multi_avg_fn(decay)
    ema = AveragedModel(model, multi_avg_fn=average, use_buffers=True)
    ema.requires_grad_(False)
    return ema
