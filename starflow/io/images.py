"""Conversions between model space ([-1, 1] floats) and 8-bit images, and PNG grids."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
from PIL import Image


def dequantize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] -> continuous y = 2u - 1 with u = (pixel + U[0,1)) / 256 (DESIGN.md §2)."""
    noise = torch.rand(images.shape, generator=generator, device=images.device)
    return (images.float() + noise) / 128.0 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model-space [-1, 1] -> uint8 (the inverse of dequantize's bin centre)."""
    return ((x.float() + 1.0) * 128.0).floor().clamp(0, 255).to(torch.uint8)


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


def check_finite_images(images: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` if float images hold NaN or infinity (they would be written as black)."""
    from starflow.errors import NonFiniteError

    if images.is_floating_point() and not bool(torch.isfinite(images).all()):
        bad = int((~torch.isfinite(images.reshape(images.shape[0], -1))).any(1).sum()) if images.ndim > 1 else 1
        raise NonFiniteError(f"{what}: {bad} image(s) contain NaN or infinity (the model's weights or inputs "
                             "are broken); nothing written")


def save_pil(image: Image.Image, path: str) -> None:
    """Write a PIL image through the atomic writer (free space checked, never a half file)."""
    from starflow.io.hub import atomic_write

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower(), "PNG")
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt), need=image.width * image.height * len(image.getbands()))


def save_images(images: torch.Tensor, out: str, grid: bool = True, nrow: int | None = None,
                start: int = 0) -> list[str]:
    """Save a batch as one PNG grid (``out`` is a file) or one PNG per image (``out`` is a folder, files
    numbered from ``start``, so a large batch can be saved in chunks)."""
    from starflow.errors import check_output_dir

    check_finite_images(images, f"images for {out}")
    if grid:
        save_pil(make_grid(images, nrow), out)
        return [out]
    check_output_dir(out, "output folder")
    os.makedirs(out, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        path = os.path.join(out, f"{start + i:04d}.png")
        save_pil(to_pil(img), path)
        paths.append(path)
    return paths
