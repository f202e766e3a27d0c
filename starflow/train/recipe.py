"""A YAML recipe: which model family, its config, and how to train it (``starflow train --config``).

The family's config class comes from the model registry, so the recipe names a ``model_type`` and
this module never imports a model module itself.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import yaml

from starflow.errors import ConfigError, LimitError
from starflow.flow.config import FlowConfig
from starflow.io.hub import check_config_file
from starflow.models import model_class
from starflow.schema import require
from starflow.train.config import TrainConfig


@dataclass
class RunConfig:
    """What a YAML recipe holds: which model family, its config, and how to train it."""

    model_type: str = "starflow"
    model: object = field(default_factory=FlowConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def record_noise_std(model_config, train: TrainConfig) -> None:
    """Write the training noise into the model's config (in place), so the saved model says which
    distribution it learned (data + N(0, noise_std^2)). A model config that already names a different
    value contradicts the recipe and is refused."""
    if model_config.noise_std is None:
        model_config.noise_std = train.noise_std
    elif model_config.noise_std != train.noise_std:
        raise ConfigError(f"model.noise_std is {model_config.noise_std} but train.noise_std is {train.noise_std}; "
                          "the model records the noise it was trained with (set train.noise_std only)")


def _build(cls, data: dict, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(names)}")
    try:
        return cls(**data)
    except LimitError as e:
        raise LimitError(f"{where}: {e}") from None
    except (ValueError, TypeError) as e:  # the peers' configs raise plain ValueError
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str, what: str = "YAML file") -> dict:
    """A YAML mapping from ``path`` (safe loader), or ``ConfigError`` naming the file and the problem."""
    check_config_file(path, what, "YAML")
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {path} is not valid YAML: {' '.join(str(e).split())}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {path} is not a text file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a mapping (field: value), got a {type(data).__name__}")
    return data


def load_run_config(path: str, overrides: dict | None = None) -> RunConfig:
    data = read_yaml(path, "recipe")
    for section in ("model", "train"):
        require(data.get(section) is None or isinstance(data[section], dict), f"{path}: {section}",
               f"must be a mapping of field: value, got {type(data.get(section)).__name__}")
    unknown = set(data) - {"model_type", "model", "train"}
    if unknown:
        raise ConfigError(f"{path}: unknown section(s) {sorted(unknown)}; expected 'model_type', 'model' and 'train'")
    model = dict(data.get("model") or {})
    train = dict(data.get("train") or {})
    model_type = data.get("model_type", "starflow")
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if key == "model_type":
            model_type = value
            continue
        {"model": model, "train": train}[section][name] = value
    try:
        cls = model_class(model_type).config_class
    except ValueError as e:
        raise ConfigError(f"{path}: model_type: {e}") from None
    return RunConfig(model_type, _build(cls, model, f"{path}: model"), _build(TrainConfig, train, f"{path}: train"))
