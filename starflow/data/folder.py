"""A users' own images: one sub-folder per class (``root/cat/x.png``), or a flat folder (one class)."""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from starflow.errors import LimitError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


class ImageFolderDataset(Dataset):
    """Images resized (center-crop then resize) to ``size`` and returned as uint8 tensors [C,H,W].

    Files that are not readable images (truncated, wrong format) are skipped and counted in
    ``self.skipped`` instead of failing the run.
    """

    def __init__(self, root: str, size: int, channels: int = 3):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.root, self.size, self.channels = root, size, channels
        subdirs = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        self.classes = subdirs or ["_all"]
        self.samples: list[tuple[str, int]] = []
        for label, cls in enumerate(self.classes):
            folder = root if cls == "_all" else os.path.join(root, cls)
            for name in sorted(os.listdir(folder)):
                if name.lower().endswith(IMAGE_EXTENSIONS):
                    self.samples.append((os.path.join(folder, name), label))
        self.skipped: list[str] = []
        self._validate()
        if not self.samples:
            raise ValueError(f"no readable images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def _validate(self):
        good = []
        for path, label in self.samples:
            try:
                with Image.open(path) as im:
                    im.load()
                good.append((path, label))
            except Image.DecompressionBombError as e:
                raise LimitError(f"training image {path} is too large to decode safely ({e})") from None
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                self.skipped.append(path)
                warnings.warn(f"skipping unreadable image {path}: {e}")
        self.samples = good

    def load_pil(self, path: str) -> Image.Image:
        """The file as a PIL image in the dataset's mode, full size (aspect-ratio buckets crop it later)."""
        with Image.open(path) as im:
            return im.convert("L" if self.channels == 1 else "RGB")

    def load(self, path: str) -> torch.Tensor:
        with Image.open(path) as im:
            im = im.convert("L" if self.channels == 1 else "RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((self.size, self.size), Image.BICUBIC)
            arr = np.asarray(im, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[None]
        else:
            arr = arr.transpose(2, 0, 1)
        return torch.from_numpy(arr.copy())

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        return self.load(path), torch.tensor(label)
