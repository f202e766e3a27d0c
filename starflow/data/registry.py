"""Build a dataset from a config name: ``mnist``, ``digits``, ``shapes`` or ``folder:/path/to/images``."""
from __future__ import annotations

from torch.utils.data import Dataset

from starflow.data.captioned import CaptionedImages
from starflow.data.digits import DigitsDataset
from starflow.data.folder import ImageFolderDataset
from starflow.data.shapes import ShapesDataset


def build_dataset(name: str, split: str = "train", image_size: int | None = None, channels: int = 3,
                  size: int = 10000) -> Dataset:
    if name in ("mnist", "digits"):
        return DigitsDataset(name, split)
    if name == "shapes":
        scenes = ShapesDataset(split, size=size, image_size=image_size or 32)
        return CaptionedImages(scenes.images(), scenes.captions)
    if name.startswith("folder:"):
        if image_size is None:
            raise ValueError("a folder dataset needs image_size")
        return ImageFolderDataset(name[len("folder:"):], image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; expected 'mnist', 'digits', 'shapes' or 'folder:PATH'")
