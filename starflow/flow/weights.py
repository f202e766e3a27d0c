"""A flow's weights on disk: one ``model.safetensors``, or, when large, shards in the huggingface layout
(``model-00001-of-00002.safetensors`` ... + ``model.safetensors.index.json`` mapping each tensor to its
file), so no single file exceeds a size that hubs and file systems handle comfortably."""
from __future__ import annotations

import json
import os

import torch

from starflow.io.hub import WEIGHTS_NAME, atomic_save_safetensors, atomic_write_bytes, load_safetensors

INDEX_NAME = "model.safetensors.index.json"
MAX_SHARD_BYTES = 5 * 1024**3


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_weights(state: dict[str, torch.Tensor], directory: str, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write ``state`` into ``directory``; returns the file names written. Stale files of the other
    layout are removed so a folder never holds two versions of the weights."""
    total = sum(_nbytes(t) for t in state.values())
    if total <= max_shard_bytes:
        atomic_save_safetensors(state, os.path.join(directory, WEIGHTS_NAME))
        _remove_shards(directory)
        return [WEIGHTS_NAME]
    groups, size = [[]], 0
    for key, t in state.items():
        if groups[-1] and size + _nbytes(t) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += _nbytes(t)
    _remove_shards(directory)
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    for name, keys in zip(names, groups):
        atomic_save_safetensors({k: state[k] for k in keys}, os.path.join(directory, name))
    index = {"metadata": {"total_size": total}, "weight_map": {k: n for n, keys in zip(names, groups) for k in keys}}
    atomic_write_bytes(os.path.join(directory, INDEX_NAME), json.dumps(index, indent=2).encode())
    single = os.path.join(directory, WEIGHTS_NAME)
    if os.path.exists(single):
        os.remove(single)
    return names + [INDEX_NAME]


def load_weights(directory: str) -> dict[str, torch.Tensor]:
    """The state dict of a folder written by ``save_weights`` (either layout)."""
    index_path = os.path.join(directory, INDEX_NAME)
    if not os.path.exists(index_path):
        return load_safetensors(os.path.join(directory, WEIGHTS_NAME))
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"corrupt shard index {index_path}: {e}") from e
    state = {}
    for name in sorted(set(weight_map.values())):
        part = load_safetensors(os.path.join(directory, name))
        state.update({k: v for k, v in part.items() if weight_map.get(k) == name})
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise ValueError(f"{directory}: tensors listed in {INDEX_NAME} but absent from their shard: {missing[:5]}")
    return state


def _remove_shards(directory: str) -> None:
    index_path = os.path.join(directory, INDEX_NAME)
    if not os.path.exists(index_path):
        return
    with open(index_path) as f:
        names = set(json.load(f).get("weight_map", {}).values())
    for name in names:
        path = os.path.join(directory, name)
        if os.path.exists(path):
            os.remove(path)
    os.remove(index_path)
