"""Random parameter initialisers that cost nothing when a model is built on the meta device.

``from_pretrained`` builds a model under ``torch.device("meta")`` and then assigns the stored weights, so
the initial values are never used. torch's meta kernel for ``randn`` is a Python reference whose first
call imports ``torch._dynamo`` and sympy (about 1 s of CPU, as much as ``import torch`` itself), which
every command loading a model would pay. On meta we therefore return an empty tensor of the same shape;
anywhere else the draw is exactly ``torch.randn(*shape) * std``, so seeded initialisation is unchanged.
"""
from __future__ import annotations

import torch


def randn(*shape: int, std: float | None = None) -> torch.Tensor:
    """``torch.randn(*shape)`` (times ``std`` if given) on the default device; uninitialised on meta."""
    if torch.get_default_device().type == "meta":
        return torch.empty(*shape)
    x = torch.randn(*shape)
    return x if std is None else x * std
