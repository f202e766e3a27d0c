"""``save_pretrained`` / ``from_pretrained`` in the huggingface_hub layout: ``config.json`` +
``model.safetensors``. Weights load through safetensors only (never unpickled)."""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write via a temp file in the same folder + rename, so a crash never leaves a half file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"corrupt or unreadable checkpoint {path}: {e}") from e


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a saved model directory?")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt config {path}: {e}") from e


class PretrainedMixin:
    """For an ``nn.Module`` whose constructor takes one dataclass config (``self.config``).

    Subclasses set ``config_class`` and ``model_type`` (stored in config.json so a directory says
    which model it holds).
    """

    config_class: type
    model_type: str

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        cfg = {"model_type": self.model_type, **dataclasses.asdict(self.config)}
        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2).encode())
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        atomic_save_safetensors(state, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def config_from_dict(cls, cfg: dict):
        cfg = dict(cfg)
        found = cfg.pop("model_type", cls.model_type)
        if found != cls.model_type:
            raise ValueError(f"directory holds a {found!r} model, not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown {cls.config_class.__name__} fields in config: {sorted(unknown)}")
        return cls.config_class(**cfg)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu"):
        config = cls.config_from_dict(read_config(directory))
        model = cls(config)
        state = load_safetensors(os.path.join(directory, WEIGHTS_NAME))
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"checkpoint {directory} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(map_location)
