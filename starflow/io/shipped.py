"""The models shipped inside the package (``starflow/assets``) and how a user names them.

A model is named either by a shipped name (``mnist``, ``mnist-pixel``, ``mnist-likelihood``, ``shapes``,
``edit``, optionally written ``starflow:NAME``) or by a directory. Names work from any folder; a directory that exists wins over a
shipped name, so a local folder called ``mnist`` is still reachable. Imports nothing heavy.
"""
from __future__ import annotations

import os

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_DIGITS_MODEL = os.path.join(ASSETS, "starflow_mnist")
PIXEL_DIGITS_MODEL = os.path.join(ASSETS, "starflow_mnist_pixel")  # pixel space, class-conditional, σ = 0.1 noise
LIKELIHOOD_DIGITS_MODEL = os.path.join(ASSETS, "starflow_mnist_likelihood")  # pixel space, unconditional, no noise:
                                                                            # exact bits/dim of digit images
DEFAULT_TEXT_MODEL = os.path.join(ASSETS, "starflow_shapes")
DEFAULT_EDIT_MODEL = os.path.join(ASSETS, "starflow_edit")

# shipped name -> directory
SHIPPED = {
    "mnist": DEFAULT_DIGITS_MODEL,
    "mnist-pixel": PIXEL_DIGITS_MODEL,
    "mnist-likelihood": LIKELIHOOD_DIGITS_MODEL,
    "shapes": DEFAULT_TEXT_MODEL,
    "edit": DEFAULT_EDIT_MODEL,
}
PREFIX = "starflow:"
MODEL_HELP = f"a shipped model ({', '.join(SHIPPED)}) or a pipeline/model directory"


def is_shipped_name(spec: str) -> bool:
    name = spec[len(PREFIX):] if spec.startswith(PREFIX) else spec
    return name in SHIPPED


def resolve_model(spec: str | os.PathLike) -> str:
    """A model name or directory -> an existing directory. Raises FileNotFoundError naming the choices."""
    spec = os.fspath(spec)
    if spec.startswith(PREFIX):
        name = spec[len(PREFIX):]
        if name not in SHIPPED:
            raise FileNotFoundError(f"unknown shipped model {spec!r}; shipped: {', '.join(SHIPPED)}")
        return _existing(name)
    if os.path.isdir(spec):
        return spec
    if spec in SHIPPED:
        return _existing(spec)
    raise FileNotFoundError(f"model not found: {spec!r} is neither a directory nor a shipped model "
                            f"({', '.join(SHIPPED)})")


def _existing(name: str) -> str:
    path = SHIPPED[name]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"the shipped model {name!r} is not in this install ({path})")
    return path


def shipped_sampling(name: str) -> dict:
    """The ``sampling`` entry of a shipped model's model_index.json ({} if none or not shipped)."""
    import json

    try:
        with open(os.path.join(SHIPPED[name], "model_index.json")) as f:
            return dict(json.load(f).get("sampling", {}))
    except (OSError, ValueError):
        return {}


def sampling_help(key: str, fallback, names=None) -> str:
    """'the model's own (mnist 2.0, shapes 1.0), else X' for --help texts (``names``: the shipped models
    the command takes; default: all but ``edit``, which has its own command)."""
    stored = {n: shipped_sampling(n) for n in (names or [n for n in SHIPPED if n != "edit"])}
    own = [f"{n} {d[key]}" for n, d in stored.items() if key in d]
    return f"the model's own ({', '.join(own)}), else {fallback}" if own else str(fallback)
