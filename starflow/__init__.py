"""starflow: latent normalizing flows (STARFlow / TARFlow) and peer systems on one harness."""
from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["STARFlow", "FlowConfig", "TrainConfig", "Condition", "StarflowPipeline"]

# Resolved on first access so that ``import starflow`` (and ``starflow --help``) does not import torch.
_LAZY = {
    "FlowConfig": "starflow.flow.config",
    "TrainConfig": "starflow.train.config",
    "Condition": "starflow.flow.condition",
    "STARFlow": "starflow.flow.model",
    "StarflowPipeline": "starflow.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'starflow' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
