"""Build a dataset from a config name: ``mnist``, ``digits`` or ``folder:/path/to/images``."""
from __future__ import annotations

from torch.utils.data import Dataset


def build_dataset(name: str, split: str = "train", image_size: int | None = None, channels: int = 3) -> Dataset:
    from starflow.data.digits import DigitsDataset
    from starflow.data.folder import ImageFolderDataset

    if name in ("mnist", "digits"):
        return DigitsDataset(name, split)
    if name.startswith("folder:"):
        if image_size is None:
            raise ValueError("a folder dataset needs image_size")
        return ImageFolderDataset(name[len("folder:"):], image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; expected 'mnist', 'digits' or 'folder:PATH'")
