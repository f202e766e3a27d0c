"""``save_pretrained`` / ``from_pretrained`` in the huggingface_hub layout: ``config.json`` +
``model.safetensors``. Weights load through safetensors only (never unpickled)."""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import tempfile
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from starflow.errors import (CheckpointError, ConfigError, DiskFullError, LimitError, NonFiniteError, OutputError, UnsafePathError,
                             as_output_error, check_output_dir)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


# Writes keep this much room free beyond the file itself (file-system metadata, the log, a manifest).
SPACE_MARGIN = 1 << 20


def ensure_space(folder: str, need: int, path: str) -> None:
    """Raise ``DiskFullError`` before writing ``need`` bytes into ``folder`` if they cannot fit."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: let the write itself report
    if free < need + SPACE_MARGIN:
        raise DiskFullError(errno.ENOSPC, f"disk full: writing {path} needs about {need / 1e6:.3g} MB, "
                                          f"{free / 1e6:.3g} MB free; the previous file (if any) is unchanged")


def atomic_write(path: str, write: Callable[[str], None], need: int = 0) -> None:
    """The one way starflow writes a file: check the folder and its free space, let ``write(tmp)`` fill a
    temp file in the same folder, fsync, and rename over ``path``. A crash or a full disk never leaves a
    half file in place of the previous one; ``OSError`` becomes ``OutputError``/``DiskFullError``."""
    folder = os.path.dirname(os.path.abspath(path))
    check_output_dir(folder, "output folder")
    if os.path.isdir(path):
        raise OutputError(errno.EISDIR, f"cannot write {path}: it is a folder, expected a file")
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        ensure_space(folder, need, path)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
        os.close(fd)
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        if isinstance(e, OutputError):
            raise
        raise as_output_error(e, path) from None
    except SafetensorError as e:
        if "No space" in str(e) or "os error 28" in str(e):
            raise DiskFullError(errno.ENOSPC, f"disk full while writing {path}; the previous file (if any) "
                                              "is unchanged") from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through ``atomic_write``."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
    atomic_write(path, write, len(data))


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def check_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    """Raise ``NonFiniteError`` naming the first floating tensor that holds NaN or infinity."""
    for name, t in tensors.items():
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all()):
            raise NonFiniteError(f"{what}: tensor {name!r} contains NaN or infinity")


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), tensor_bytes(tensors))


def inside(folder: str, name: str, what: str) -> str:
    """``folder/name`` if it stays inside ``folder`` (after symlinks); ``UnsafePathError`` otherwise.

    Used for paths read from files (a pipeline index, a checkpoint manifest, a noise file), which
    must only point inside their own folder."""
    if not isinstance(name, str) or not name or os.path.isabs(name):
        raise UnsafePathError(f"{what}: {name!r} must be a relative path inside {folder}")
    root = os.path.realpath(folder)
    full = os.path.realpath(os.path.join(root, name))
    if os.path.commonpath([root, full]) != root:
        raise UnsafePathError(f"{what}: {name!r} points outside {folder}")
    return os.path.join(folder, name)


def load_safetensors(path: str) -> dict[str, torch.Tensor]:
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {' '.join(str(e).split())}") from e


def check_config_file(path: str, what: str, kind: str) -> None:
    """``ConfigError`` naming ``path`` when it is a folder or missing (``kind``: "JSON", "YAML")."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} {path} is a folder, expected a {kind} file")
    if not os.path.exists(path):
        raise ConfigError(f"{what} {path} does not exist")


def read_json(path: str, what: str = "JSON file") -> dict:
    """A JSON object from ``path``; ``ConfigError`` naming the file for a folder, a missing or corrupt
    file, or JSON that is not an object."""
    check_config_file(path, what, "JSON")
    try:
        with open(path) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"corrupt {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got a {type(data).__name__}")
    return data


def read_config(directory: str) -> dict:
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"model directory not found: {directory}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{directory} has no {CONFIG_NAME}; is it a saved model directory?")
    return read_json(path, "config")


class PretrainedMixin:
    """For an ``nn.Module`` whose constructor takes one dataclass config (``self.config``).

    Subclasses set ``config_class`` and ``model_type`` (stored in config.json so a directory says
    which model it holds).
    """

    config_class: type
    model_type: str

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        check_output_dir(directory, "model folder")
        os.makedirs(directory, exist_ok=True)
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        check_finite(state, f"weights to save in {directory}")  # before anything is written
        cfg = {"model_type": self.model_type, **dataclasses.asdict(self.config)}
        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2).encode())
        atomic_save_safetensors(state, os.path.join(directory, WEIGHTS_NAME))

    @classmethod
    def config_from_dict(cls, cfg: dict):
        cfg = dict(cfg)
        found = cfg.pop("model_type", cls.model_type)
        if found != cls.model_type:
            raise ConfigError(f"directory holds a {found!r} model, not {cls.model_type!r}")
        names = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = set(cfg) - names
        if unknown:
            raise ConfigError(f"unknown {cls.config_class.__name__} fields in config: {sorted(unknown)}")
        return cls.config_class(**cfg)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu"):
        try:
            config = cls.config_from_dict(read_config(directory))
        except (ValueError, TypeError) as e:
            if isinstance(e, (ConfigError, LimitError)) and str(e).startswith(directory):
                raise
            kind = LimitError if isinstance(e, LimitError) else ConfigError
            raise kind(f"{os.path.join(directory, CONFIG_NAME)}: {e}") from None
        model = cls(config)
        state = load_safetensors(os.path.join(directory, WEIGHTS_NAME))
        own = model.state_dict()
        state = {k: v.to(own[k].dtype) if k in own and v.is_floating_point() else v for k, v in state.items()}
        wrong = [f"{k} {tuple(v.shape)} (config wants {tuple(own[k].shape)})" for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
        if wrong:
            raise CheckpointError(f"checkpoint {directory} does not match its config: {len(wrong)} tensor(s) "
                                  f"have the wrong shape, e.g. {wrong[0]}")
        check_finite(state, f"weights of {directory}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint {directory} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        return model.to(map_location)
