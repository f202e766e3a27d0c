"""Conversions between model space ([-1, 1] floats) and 8-bit images, and PNG grids."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from starflow.data.spaces import bins_to_uint8 as to_uint8  # noqa: F401  (model space [-1, 1] -> uint8)
from starflow.data.spaces import dequantize  # noqa: F401  (re-exported: the conversions live in data.spaces)
from starflow.errors import NonFiniteError, check_output_dir
from starflow.io.hub import atomic_write


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [C, H, W] (uint8, or float in [-1, 1]) -> PIL."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    arr = image.detach().cpu().numpy()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")


# Grids: mid-grey separators stay visible against both black (digits) and white backgrounds.
SEPARATOR = 128
# Tiles smaller than this (px) are enlarged by an integer factor when the scale is automatic.
AUTO_SCALE_SIDE = 64


def auto_scale(height: int, width: int) -> int:
    """Integer nearest-neighbour factor that brings a tile to at least AUTO_SCALE_SIDE px."""
    return max(1, math.ceil(AUTO_SCALE_SIDE / max(height, width, 1)))


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, scale: int = 1,
              pad_value: int = SEPARATOR) -> Image.Image:
    """A batch [B, C, H, W] -> one PIL grid, ``nrow`` tiles per row, each tile enlarged ``scale`` times
    (nearest; 0 = automatic, see ``auto_scale``), ``pad`` px separators of grey level ``pad_value``."""
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    B, C, H, W = images.shape
    scale = scale or auto_scale(H, W)
    if scale > 1:
        images = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
        H, W = H * scale, W * scale
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), pad_value, dtype=np.uint8)
    for i, img in enumerate(images.cpu().numpy()):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return to_pil(torch.from_numpy(grid))


def check_finite_images(images: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` if float images hold NaN or infinity (they would be written as black)."""

    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images.reshape(images.shape[0], -1))).any(1).sum()) if images.ndim > 1 else 1
        raise NonFiniteError(f"{what}: {bad} image(s) contain NaN or infinity (the model's weights or inputs "
                             "are broken); nothing written")


def save_pil(image: Image.Image, path: str) -> None:
    """Write a PIL image through the atomic writer (free space checked, never a half file)."""

    ext = os.path.splitext(path)[1].lower()
    # preinit() registers the common formats (PNG, JPEG, BMP, GIF, PPM); registered_extensions() imports
    # every PIL plugin (~0.05-0.1 s), so it is only asked about the rarer extensions.
    Image.preinit()
    fmt = Image.EXTENSION.get(ext) or Image.registered_extensions().get(ext, "PNG")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt), need=image.width * image.height * len(image.getbands()))


def save_images(images: torch.Tensor, out: str, grid: bool = True, nrow: int | None = None,
                scale: int = 0, start: int = 0) -> list[str]:
    """Save a batch as one PNG grid (``out`` is a file; tiles enlarged ``scale`` times, 0 = automatic) or
    one PNG per image at its own size (``out`` is a folder, files numbered from ``start``, so a large
    batch can be saved in chunks)."""

    check_finite_images(images, f"images for {out}")
    if grid:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        save_pil(make_grid(images, nrow, scale=scale), out)
        return [out]
    check_output_dir(out, "output folder")
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = os.path.join(out, f"{start + i:04d}.png")
        save_pil(to_pil(img), path)
        paths.append(path)
    return paths
