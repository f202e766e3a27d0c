"""Load any saved model directory by the ``model_type`` its config.json names."""
from __future__ import annotations

import importlib

# model_type -> "module:Class"
MODEL_TYPES = {
    "starflow": "starflow.flow.model:STARFlow",
    "rectified-flow": "starflow.peers.rectified_flow:RectifiedFlow",
    "flowar": "starflow.peers.flowar:FlowAR",
}


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {sorted(MODEL_TYPES)}")
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)

