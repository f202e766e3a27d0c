"""Reading a raw PyTorch ``.pth`` state dict safely: tensors only, memory-mapped, never arbitrary objects."""
from __future__ import annotations

import os
import pickle

import torch


def load_state_dict_pth(path: str) -> dict[str, torch.Tensor]:
    """A ``{name: tensor}`` dict from a ``.pth`` written by ``torch.save``.

    Loaded with ``weights_only=True`` (the unpickler refuses anything but tensors and plain containers)
    and ``mmap=True`` (tensor data stays on disk until used, so a 3B checkpoint costs no RAM to open).
    A dict wrapping the state dict under ``model``/``state_dict``/``module`` is unwrapped; anything else
    that is not a flat dict of tensors is refused.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path} holds objects other than tensors; refusing to unpickle it "
                         f"(only plain state dicts are read). Details: {str(e).splitlines()[0]}") from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path} is not a readable torch.save checkpoint (zip format): {e}") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(torch.is_tensor(v) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise ValueError(f"{path}: entries that are not tensors: {bad[:8]}")
    return obj
