"""Exponential moving average of weights, via PyTorch's own AveragedModel."""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def make_ema(model: torch.nn.Module, decay: float) -> AveragedModel:
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema
