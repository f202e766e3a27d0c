"""Schema checks shared by every config dataclass (FlowConfig, TrainConfig, the peers' configs).

``check_types(cfg)`` reads each field's annotation (``int``, ``float``, ``bool``, ``str``, ``list``,
``tuple[...]`` and ``X | None``) and refuses a value of another type, so a config.json or recipe with
``"width": "128"``, ``null`` or a list fails with the field's name instead of a ``TypeError`` deep in
``__post_init__``. ``check_model_memory`` refuses a model whose estimated size would not fit in this
machine's memory, before anything is allocated.
"""
from __future__ import annotations

import dataclasses
import math
import os

from starflow.errors import ConfigError, LimitError

_TYPE_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
               "list": "a list", "tuple": "a list", "None": "null", "object": "anything"}


def require(cond: bool, name: str, msg: str) -> None:
    """Raise ``ConfigError("name: msg")`` unless ``cond``: the one-line range check of every config."""
    if not cond:
        raise ConfigError(f"{name}: {msg}")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _accepts(kind: str, value) -> bool:
    if kind == "int":
        return is_int(value)
    if kind == "float":
        return is_number(value) and math.isfinite(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind in ("list", "tuple"):
        return isinstance(value, (list, tuple))
    if kind == "None":
        return value is None
    return True  # an annotation this checker does not model


def _kinds(annotation) -> list[str]:
    """``"tuple[int, ...] | None"`` -> ``["tuple", "None"]``."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    return [part.strip().split("[")[0] for part in text.split("|")]


def check_types(cfg) -> None:
    """Raise ``ConfigError`` naming the first field whose value does not match its annotation.

    A float field also takes a string YAML reads for a number without a dot (``1e-3``); it is converted."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        kinds = _kinds(f.type)
        if "float" in kinds and isinstance(value, str):
            try:
                value = float(value)
                setattr(cfg, f.name, value)
            except ValueError:
                pass
        if not any(_accepts(k, value) for k in kinds):
            expected = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
            finite = " (finite)" if "float" in kinds and is_number(value) else ""
            raise ConfigError(f"{f.name}: must be {expected}{finite}, got {value!r} ({type(value).__name__})")


def check_noise_std(cfg) -> None:
    """A model config's ``noise_std``: the std of the Gaussian noise its training data carried (the model
    learned the density of data + N(0, noise_std^2)), recorded by the trainer; None = not recorded (a
    folder saved before configs held it: its pipeline's model_index.json does)."""
    value = cfg.noise_std
    require(value is None or value >= 0, "noise_std", f"must be >= 0 or null, got {value}")


def check_positive(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")


def memory_limit_bytes() -> int:
    """What a model may take: this machine's physical memory, or ``STARFLOW_MAX_MODEL_BYTES`` if set."""
    env = os.environ.get("STARFLOW_MAX_MODEL_BYTES")
    if env:
        return int(float(env))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def _gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"


def check_model_memory(params: float, activations: float = 0.0, what: str = "the model",
                       bytes_per_param: float = 4.0) -> None:
    """Refuse a model whose fp32 weights (``params``) plus one example's activations (``activations``
    floats) would not fit in memory (weights at ``bytes_per_param``, activations in fp32). Estimates are rough (within a small factor); the point is to say
    "this will not fit" before trying to allocate terabytes."""
    need = bytes_per_param * params + 4.0 * activations
    limit = memory_limit_bytes()
    if need > limit:
        raise LimitError(f"{what} would need about {_gb(need)} ({params / 1e6:.4g}M parameters) but "
                         f"this machine has {_gb(limit)}; reduce width, depth/num_blocks, image_size or num_classes")


def transformer_params(width: float, layers: float, mlp_ratio: float) -> float:
    """Weights of ``layers`` pre-norm transformer layers (attention 4 w^2, MLP 2 r w^2)."""
    return layers * (4 + 2 * mlp_ratio) * width * width
