"""The model-family registry: ``model_type`` (as config.json names it) -> the class that loads it.

Families are named as ``"module:Class"`` strings and imported on first use, so importing the registry
does not import every family (and a family's own modules may import the package's configs freely).
Each registered class conforms to ``starflow.protocols.GenerativeModel``; flows also to
``LikelihoodModel``."""
from __future__ import annotations

import importlib

# model_type -> "module:Class"
MODEL_TYPES = {
    "starflow": "starflow.flow.model:STARFlow",
    "starflow-edit": "starflow.flow.edit:EditSTARFlow",
    "rectified-flow": "starflow.peers.rectified_flow:RectifiedFlow",
    "flowar": "starflow.peers.flowar:FlowAR",
}


def register(model_type: str, target: str) -> None:
    """Add a family: ``target`` is ``"package.module:Class"``. Re-registering the same target is a no-op;
    a different target for a taken name is an error (two families cannot share a saved name)."""
    module, sep, name = target.partition(":")
    if not (module and sep and name):
        raise ValueError(f"register: target must be 'module:Class', got {target!r}")
    if MODEL_TYPES.get(model_type, target) != target:
        raise ValueError(f"model_type {model_type!r} is already registered as {MODEL_TYPES[model_type]!r}")
    MODEL_TYPES[model_type] = target


def model_types() -> list[str]:
    """The registered model types, sorted."""
    return sorted(MODEL_TYPES)


def model_class(model_type: str):
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {model_types()}")
    module, name = MODEL_TYPES[model_type].split(":")
    return getattr(importlib.import_module(module), name)

