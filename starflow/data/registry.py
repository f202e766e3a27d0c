"""Datasets by name, in one place: ``build_dataset`` for the flow trainer and the evaluations (``mnist``,
``digits``, ``shapes``, ``shapes-edit``, ``folder:PATH``) and ``load_named_dataset`` for the autoencoder
tools and latent caches, which read ``shapes[:N]`` as the raw scenes (captions as labels) instead."""
from __future__ import annotations

from torch.utils.data import Dataset

from starflow.data.captioned import CaptionedImages
from starflow.data.digits import DigitsDataset
from starflow.data.edits import EditDataset, EditPairs
from starflow.data.folder import ImageFolderDataset
from starflow.data.shapes import ShapesDataset


def build_dataset(name: str, split: str = "train", image_size: int | None = None, channels: int = 3,
                  size: int = 10000, categories=None) -> Dataset:
    """``categories``: for ``shapes``, the caption categories the scenes cycle through (``None``: all)."""
    if name in ("mnist", "digits"):
        return DigitsDataset(name, split)
    if name == "shapes":
        scenes = ShapesDataset(split, size=size, image_size=image_size or 32, categories=categories)
        return CaptionedImages(scenes.images(), scenes.captions)
    if name == "shapes-edit":  # (source, instruction, target) triples of shapes scenes
        return EditPairs(EditDataset(split, size=size, image_size=image_size or 32))
    if name.startswith("folder:"):
        if image_size is None:
            raise ValueError("a folder dataset needs image_size")
        return ImageFolderDataset(name[len("folder:"):], image_size, channels)
    raise ValueError(f"unknown dataset {name!r}; expected 'mnist', 'digits', 'shapes', 'shapes-edit' or "
                     "'folder:PATH'")


def load_named_dataset(name: str, split: str = "train", image_size: int | None = None, channels: int = 3):
    """``mnist``, ``digits``, ``folder:PATH`` (as ``build_dataset``) or ``shapes[:N_TRAIN]``
    (synthetic captioned scenes; train split N_TRAIN = 10,000 scenes by default, test split 500)."""
    if name == "shapes" or name.startswith("shapes:"):
        n_train = int(name.split(":", 1)[1]) if ":" in name else 10_000
        kw = {"image_size": image_size} if image_size else {}
        return ShapesDataset(split=split, size=n_train if split == "train" else 500, **kw)
    return build_dataset(name, split, image_size=image_size, channels=channels)
