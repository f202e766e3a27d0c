"""Conversions between model space ([-1, 1] floats) and 8-bit images, and PNG grids."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image

from starflow.data.spaces import bins_to_uint8 as to_uint8  # noqa: F401  (model space [-1, 1] -> uint8)
from starflow.data.spaces import dequantize  # noqa: F401  (re-exported: the conversions live in data.spaces)


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image [C, H, W] (uint8, or float in [-1, 1]) -> PIL."""
    if image.dtype != torch.uint8:
        image = to_uint8(image)
    arr = image.detach().cpu().numpy()
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], mode="L")
    return Image.fromarray(arr.transpose(1, 2, 0), mode="RGB")


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2) -> Image.Image:
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    B, C, H, W = images.shape
    nrow = nrow or math.ceil(math.sqrt(B))
    ncol = math.ceil(B / nrow)
    grid = np.zeros((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), dtype=np.uint8)
    for i, img in enumerate(images.cpu().numpy()):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = img
    return to_pil(torch.from_numpy(grid))


def save_images(images: torch.Tensor, out: str, grid: bool = True, nrow: int | None = None) -> list[str]:
    """Save a batch as one PNG grid (``out`` is a file) or one PNG per image (``out`` is a folder)."""
    if grid:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        make_grid(images, nrow).save(out)
        return [out]
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = os.path.join(out, f"{i:04d}.png")
        to_pil(img).save(path)
        paths.append(path)
    return paths
