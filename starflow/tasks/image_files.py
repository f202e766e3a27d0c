"""User image files for the tasks: read one into the shape a model takes, with a note for each conversion.

PNG/JPEG/anything Pillow reads. Conversions are done with a note (a ``UserWarning``; the CLIs print them
as ``note: ...`` inside ``notes()``): RGBA / LA / palette images with transparency are composited onto
the black background of the training data; RGB -> grayscale uses Pillow's ITU-R 601 luma; grayscale ->
RGB repeats the channel; 16-bit and float grayscale are rescaled to 8 bits; animated files use their
first frame. A square image of another size is resized (bicubic) to the model's size with a note; a
non-square image is rejected (resizing would distort it and cropping would silently drop content).
"""
from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from starflow.errors import LimitError


def _note(msg: str) -> None:
    warnings.warn(msg, UserWarning, stacklevel=3)


def _to_mode(im, channels: int, what: str):
    """A PIL image -> 'L' (channels 1) or 'RGB' (channels 3), noting each conversion."""
    from PIL import Image

    if getattr(im, "n_frames", 1) > 1:
        _note(f"{what} has {im.n_frames} frames; using the first")
        im.seek(0)
    mode = im.mode
    target = "L" if channels == 1 else "RGB"
    if mode == target:
        return im
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # high bit-depth grayscale
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        if mode == "F" and arr.max() <= 1.0:
            hi = 1.0
        arr = np.clip(np.round(arr / hi * 255.0), 0, 255).astype(np.uint8)
        _note(f"{what} is {mode} (high bit depth grayscale); rescaled to 8 bits")
        im, mode = Image.fromarray(arr, mode="L"), "L"
        if target == "L":
            return im
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "La", "RGBa", "PA"):
        bg = Image.new("RGBA", im.size, (0, 0, 0, 255))
        im = Image.alpha_composite(bg, im.convert("RGBA")).convert("RGB")
        _note(f"{what} has an alpha channel ({mode}); composited onto a black background")
        mode = "RGB"
        if target == "RGB":
            return im
    try:
        out = im.convert(target)
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert {what} from mode {mode} to {target}: {e}") from e
    if mode != target:
        kind = "grayscale" if target == "L" else "RGB"
        _note(f"{what} is {mode}; converted to {kind} ({target}) for this {channels}-channel model")
    return out


def load_image(path: str, channels: int, size: int, what: str = "image", resize: bool = True) -> torch.Tensor:
    """An image file -> uint8 [channels, size, size], converted (with notes) as the module docstring says."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        im = Image.open(path)
        im.load()
    except Image.DecompressionBombError as e:
        raise LimitError(f"{what} {path} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read {what} {path}: not an image Pillow can decode ({e})") from e
    w, h = im.size
    if w != h:
        raise ValueError(f"{what} {path} is {w}x{h}; this model takes square {size}x{size} images "
                         f"(crop it to a square first)")
    im = _to_mode(im, channels, f"{what} {os.path.basename(path)}")
    if w != size:
        if not resize:
            raise ValueError(f"{what} {path} is {w}x{h}; this model takes {size}x{size} images")
        _note(f"{what} {os.path.basename(path)} is {w}x{h}; resized to the model's {size}x{size}")
        im = im.resize((size, size), Image.BICUBIC)
    arr = np.asarray(im, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return torch.from_numpy(arr.copy())


def image_size_of(path: str) -> tuple[int, int]:
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return im.size
    except Image.DecompressionBombError as e:
        raise LimitError(f"image {path} is too large to decode safely ({e})") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e


class notes:
    """Context manager for the CLIs: conversion notes (UserWarnings) are printed to stderr as ``note: ...``
    lines instead of Python's warning format."""

    def __enter__(self):
        self._cm = warnings.catch_warnings(record=True)
        self.records = self._cm.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cm.__exit__(*exc)
        import sys

        for r in self.records:
            print(f"note: {r.message}", file=sys.stderr)
        return False
