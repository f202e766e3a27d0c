"""Linear layers for the one-token decoder, with weights packed once for the CPU's GEMM.

A decode step multiplies a handful of rows by every weight of the block, and at that size the generic
CPU GEMM spends a large share of each call re-laying-out the weight. oneDNN can lay a weight out once
for a fixed row count and reuse it. On this CPU that pays for weights of 128k+ entries from 4 rows on
(1.1-1.8x per matmul, most for the MLP's down projection) and loses below 2 rows and on smaller weights
(a 256x256 projection runs at 0.5-0.8x), so only those are packed (``benchmarks/decode_kernels.py``).
Everything else (GPUs, float64, bf16, autograd, builds without oneDNN) takes ``F.linear`` unchanged. The packed layouts are
cached per layer and row count and dropped when the weight changes (training between samples).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

MIN_PACKED_ROWS = 4  # below this the packed call's fixed cost loses to F.linear (benchmarks/decode_kernels.py)
MIN_PACKED_WEIGHT = 1 << 17  # entries; smaller weights are faster through F.linear

_packed: weakref.WeakKeyDictionary[nn.Linear, tuple] = weakref.WeakKeyDictionary()


def plain_linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, layer.weight, layer.bias)


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedLinear:
    """``linear(x, layer)`` for x [rows, in] with a fixed row count, packed weights where they pay."""

    def __init__(self, rows: int, like: torch.Tensor, enabled: bool = True):
        self.rows = rows
        self.enabled = (enabled and rows >= MIN_PACKED_ROWS and like.device.type == "cpu"
                        and like.dtype == torch.float32 and _onednn_linear_available())

    def __call__(self, x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
        w = layer.weight
        if (not self.enabled or x.shape[0] != self.rows or x.dtype != torch.float32 or w.numel() < MIN_PACKED_WEIGHT
                or (torch.is_grad_enabled() and w.requires_grad)):
            return plain_linear(x, layer)
        key = (self.rows, w.data_ptr(), w._version)
        entry = _packed.get(layer)
        if entry is None or entry[0] != key:
            entry = (key, torch.ops.mkldnn._reorder_linear_weight(w.detach(), self.rows))
            _packed[layer] = entry
        return torch.ops.mkldnn._linear_pointwise(x, entry[1], layer.bias, "none", [], "")
