"""Training checkpoints that survive crashes.

A checkpoint is a folder ``step_0000500/`` holding model, EMA and optimizer tensors (safetensors) and a
``manifest.json`` with the step, the training state and a SHA-256 of every file. It is written into a
temporary folder and renamed into place, so a crash leaves either a complete checkpoint or none; on
resume a folder whose files do not match its manifest is skipped with a warning.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings

import torch

from starflow.hub import load_safetensors
from safetensors.torch import save_file

MANIFEST = "manifest.json"


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state dict -> (tensors, JSON-able rest), since safetensors holds tensors only."""
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(rest["scalars"].items()):
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(root: str, step: int, tensors: dict[str, dict[str, torch.Tensor]], info: dict, keep_last: int) -> str:
    """Write ``root/step_XXXXXXX`` atomically; ``tensors`` maps a file stem to a state dict."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step_{step:07d}")
    tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-step_")
    try:
        files = {}
        for stem, sd in tensors.items():
            path = os.path.join(tmp, f"{stem}.safetensors")
            save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, path)
            files[f"{stem}.safetensors"] = _sha256(path)
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": step, "files": files, **info}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step_") and os.path.isdir(os.path.join(root, n)))
    return [os.path.join(root, n) for n in names]


def verify(path: str) -> dict:
    """Return the manifest if every file is present and matches its checksum; raise otherwise."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.exists(mpath):
        raise ValueError(f"{path}: no {MANIFEST} (incomplete checkpoint)")
    with open(mpath) as f:
        manifest = json.load(f)
    for name, digest in manifest["files"].items():
        fpath = os.path.join(path, name)
        if not os.path.exists(fpath) or _sha256(fpath) != digest:
            raise ValueError(f"{path}: {name} is missing or does not match its checksum")
    return manifest


def latest_valid(root: str) -> str | None:
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path
        except (ValueError, json.JSONDecodeError) as e:
            warnings.warn(f"skipping corrupt checkpoint: {e}")
    return None


def load_checkpoint(path: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    manifest = verify(path)
    tensors = {name[: -len(".safetensors")]: load_safetensors(os.path.join(path, name)) for name in manifest["files"]}
    return manifest, tensors
