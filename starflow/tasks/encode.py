"""Exact encoding: an image -> its noise under the flow (through the autoencoder for latent models), and back.

A flow is invertible, so every image has exactly one noise tensor z = f(x) (DESIGN.md §3 "Applications"),
and f^-1(z) gives the image back up to floating-point error:

    pixel model:   uint8 image -> x = (pixel + 0.5) / 128 - 1 (the centre of the dequantisation bin)
                   -> z = flow(x | condition);  decode: x = flow^-1(z | condition) -> uint8 (floor((x+1)*128)),
                   which gives back the very same bytes (the round trip in [-1, 1] is ~1e-6).
    latent model:  uint8 image -> latents = autoencoder.encode(image) -> z = flow(latents | condition);
                   decode: latents = flow^-1(z) -> autoencoder.decode. The flow part is exact; the image
                   comes back within the autoencoder's own reconstruction error.

The noise depends on the condition (class label or prompt) because the deep block reads it; with none
given, the learned null condition (the unconditional model of guidance) is used. ``save_noise`` stores the
condition in the file's metadata so ``starflow decode`` inverts with the same one.

Per-image exact log-likelihood (``image_nll``), usable as an out-of-distribution score (higher = less
like the training data):

* pixel models: bits/dim of the 8-bit image under uniform dequantisation,
  ``bpd = NLL(x) / (D ln 2) + 7`` with ``x = (pixel + U[0,1)) / 128 - 1`` (DESIGN.md §2); one seeded
  dequantisation draw per image (``samples`` > 1 averages several).
* latent models: nats/dim of the image's (posterior-mean) latents under the flow. This is a density of
  latents, not of pixels, so it is not comparable with pixel bits/dim; it still ranks images.

A model trained with Gaussian noise augmentation (``noise_std`` > 0) has the density of *noisy* data; its
likelihood at a clean image is what is reported (it still orders in- vs out-of-distribution images).

User images (``load_image``): PNG/JPEG/anything Pillow reads. Conversions are done with a note (a
``UserWarning``): RGBA / LA / palette images with transparency are composited onto the black background
of the training data; RGB -> grayscale uses Pillow's ITU-R 601 luma; grayscale -> RGB repeats the channel;
16-bit and float grayscale are rescaled to 8 bits; animated files use their first frame. A square image of
another size is resized (bicubic) to the model's size with a note; a non-square image is rejected (resizing
would distort it and cropping would silently drop content).
"""
from __future__ import annotations

import json
import math
import os
import warnings

import numpy as np
import torch

from starflow.errors import LimitError, NonFiniteError

NOISE_FORMAT = "starflow-noise-v1"


# ---------------------------------------------------------------------------------------------------
# The pipeline a user has, whatever they pass
# ---------------------------------------------------------------------------------------------------


def as_pipeline(model_or_pipe):
    """A ``StarflowPipeline`` from a pipeline, a bare STARFlow, or a model/pipeline directory."""
    from starflow.pipeline import StarflowPipeline

    if isinstance(model_or_pipe, StarflowPipeline):
        return model_or_pipe
    if isinstance(model_or_pipe, (str, os.PathLike)):
        return StarflowPipeline.from_pretrained(str(model_or_pipe))
    if isinstance(model_or_pipe, torch.nn.Module):
        return StarflowPipeline(model_or_pipe)
    raise TypeError(f"expected a StarflowPipeline, a STARFlow model or a directory, got {type(model_or_pipe).__name__}")


def _flow(pipe):
    model = pipe.model
    if not hasattr(model, "log_prob") or not hasattr(model, "inverse"):
        raise ValueError(f"{type(model).__name__} is not an invertible flow; exact encoding needs a STARFlow model")
    return model


def space(pipe) -> str:
    """'latent' when the flow lives in an autoencoder's latent space, else 'pixel'."""
    return "latent" if pipe.autoencoder is not None else "pixel"


def condition_args(pipe, n: int, y=None, prompt=None) -> tuple[torch.Tensor | None, object]:
    """(class labels, text states) for ``n`` images from a user's class / prompt (either may be None)."""
    if y is not None and prompt is not None:
        raise ValueError("give a class label or a prompt, not both")
    labels = text = None
    if y is not None:
        if not pipe.num_classes:
            raise ValueError("this model is not class-conditional; do not pass a class label")
        labels = torch.as_tensor(y, dtype=torch.long).reshape(-1)
        if labels.numel() == 1:
            labels = labels.expand(n).clone()
        if labels.numel() != n:
            raise ValueError(f"got {labels.numel()} class labels for {n} images")
        if bool(((labels < 0) | (labels >= pipe.num_classes)).any()):
            raise ValueError(f"class label out of range [0, {pipe.num_classes}): {labels.tolist()}")
        labels = labels.to(pipe.device)
    if prompt is not None:
        if not pipe.is_text_conditional:
            raise ValueError("this model is not text-conditional; do not pass a prompt")
        prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
        if len(prompts) != n:
            raise ValueError(f"got {len(prompts)} prompts for {n} images")
        if any(not p.strip() for p in prompts):
            raise ValueError("empty prompt")
        text = pipe.encode_prompts(prompts)
    return labels, text


# ---------------------------------------------------------------------------------------------------
# pixels <-> model space
# ---------------------------------------------------------------------------------------------------


def _as_batch(images: torch.Tensor) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch tensor, got {type(images).__name__}")
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"images must be [C, H, W] or [B, C, H, W], got shape {tuple(images.shape)}")
    return images


def check_images(pipe, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] of the pipeline's image shape (a single [C, H, W] image is batched)."""
    images = _as_batch(images)
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (0..255), got {images.dtype}; load files with load_image")
    if tuple(images.shape[1:]) != tuple(pipe.image_shape):
        raise ValueError(f"this model takes images of shape {tuple(pipe.image_shape)} (C, H, W), "
                         f"got {tuple(images.shape[1:])}")
    return images


def pixels_to_float(pipe, images: torch.Tensor) -> torch.Tensor:
    """uint8 -> float [-1, 1] in the convention of the pipeline's space (bin centres for pixel models,
    the autoencoder's ``x / 127.5 - 1`` for latent models); ``float_to_pixels`` inverts it exactly."""
    if pipe.autoencoder is None:
        return (images.float() + 0.5) / 128.0 - 1.0
    from starflow.components.autoencoder import images_to_float

    return images_to_float(images)


def float_to_pixels(pipe, x: torch.Tensor) -> torch.Tensor:
    if pipe.autoencoder is None:
        from starflow.io.images import to_uint8

        return to_uint8(x)
    from starflow.components.autoencoder import images_to_uint8

    return images_to_uint8(x)


@torch.no_grad()
def to_model_space(pipe, images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> what the flow models: [-1, 1] pixels, or normalised latents (posterior mean)."""
    images = check_images(pipe, images).to(pipe.device)
    x = pixels_to_float(pipe, images)
    if pipe.autoencoder is not None:
        x = pipe.autoencoder.encode(x).float()
    return x


@torch.no_grad()
def from_model_space(pipe, x: torch.Tensor) -> torch.Tensor:
    """Model space -> float images in [-1, 1] (decoded for latent models; no denoising)."""
    if pipe.autoencoder is not None:
        x = pipe.autoencoder.decode(x)
    return x.clamp(-1, 1)


# ---------------------------------------------------------------------------------------------------
# encode / decode
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def encode(pipe, images: torch.Tensor, y=None, prompt=None) -> torch.Tensor:
    """uint8 images [B, C, H, W] (or one [C, H, W]) -> their exact noise z [B, *model shape]."""
    pipe = as_pipeline(pipe)
    model = _flow(pipe)
    x = to_model_space(pipe, images)
    labels, text = condition_args(pipe, x.shape[0], y, prompt)
    return model(x, labels, text)[0]


@torch.no_grad()
def decode_to_model_space(pipe, z: torch.Tensor, y=None, prompt=None, **inverse_kwargs) -> torch.Tensor:
    """Noise -> model space (pixels in [-1, 1] or latents), the exact inverse of the flow."""
    pipe = as_pipeline(pipe)
    model = _flow(pipe)
    z = _as_batch(z).float().to(pipe.device)
    labels, text = condition_args(pipe, z.shape[0], y, prompt)
    return model.inverse(z, labels, text, **inverse_kwargs)


@torch.no_grad()
def decode(pipe, z: torch.Tensor, y=None, prompt=None, **inverse_kwargs) -> torch.Tensor:
    """Noise -> uint8 images [B, C, H, W]. The inverse of ``encode`` (bytes-exact for pixel models)."""
    pipe = as_pipeline(pipe)
    x = decode_to_model_space(pipe, z, y, prompt, **inverse_kwargs)
    return float_to_pixels(pipe, from_model_space(pipe, x)).cpu()


@torch.no_grad()
def round_trip_error(pipe, images: torch.Tensor, y=None, prompt=None) -> dict:
    """Encode then decode; report the errors: ``model_space`` (max |x - f^-1(f(x))| where the flow
    lives: [-1,1] pixels or latents), ``pixels`` (max |uint8 difference| of the decoded image) and, for
    latent models, ``reconstruction`` (the autoencoder's own max |uint8 difference|, the floor)."""
    pipe = as_pipeline(pipe)
    images = check_images(pipe, images)
    x = to_model_space(pipe, images)
    z = encode(pipe, images, y, prompt)
    x2 = decode_to_model_space(pipe, z, y, prompt)
    out = {"model_space": (x2 - x).abs().max().item(),
           "pixels": (float_to_pixels(pipe, from_model_space(pipe, x2)).cpu().int() - images.int()).abs().max().item()}
    if pipe.autoencoder is not None:
        rec = float_to_pixels(pipe, from_model_space(pipe, x)).cpu().int()
        out["reconstruction"] = (rec - images.int()).abs().max().item()
    return out


# ---------------------------------------------------------------------------------------------------
# exact per-image likelihood
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def image_nll(pipe, images: torch.Tensor, y=None, prompt=None, samples: int = 1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, str]:
    """Exact negative log-likelihood per image: (values [B], unit), unit 'bits/dim' (pixel models,
    dequantised 8-bit images) or 'nats/dim' (latent models, density of the latents)."""
    pipe = as_pipeline(pipe)
    model = _flow(pipe)
    images = check_images(pipe, images).to(pipe.device)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    labels, text = condition_args(pipe, images.shape[0], y, prompt)
    if pipe.autoencoder is not None:
        return model.nll(to_model_space(pipe, images), labels, text).cpu(), "nats/dim"
    from starflow.io.images import dequantize

    total = torch.zeros(images.shape[0], dtype=torch.float64)
    for _ in range(samples):
        x = dequantize(images, generator=generator)
        total += (model.nll(x, labels, text) / math.log(2) + 7.0).double().cpu()
    return (total / samples).float(), "bits/dim"


# ---------------------------------------------------------------------------------------------------
# noise files
# ---------------------------------------------------------------------------------------------------


def save_noise(path: str, z: torch.Tensor, model_dir: str | None = None, y=None, prompt=None, **extra) -> None:
    """Write z to a safetensors file; metadata records the model and the condition used."""
    from starflow.io.hub import atomic_save_safetensors

    if not bool(torch.isfinite(z).all()):
        raise NonFiniteError(f"noise for {path} contains NaN or infinity; nothing written")
    meta = {"format": NOISE_FORMAT, "model": os.path.abspath(model_dir) if model_dir else "",
            "class": json.dumps(None if y is None else torch.as_tensor(y).reshape(-1).tolist()),
            "prompt": json.dumps(prompt), "shape": json.dumps(list(z.shape))}
    meta.update({k: json.dumps(v) for k, v in extra.items()})
    atomic_save_safetensors({"noise": z.float()}, path, metadata=meta)


def load_noise(path: str) -> tuple[torch.Tensor, dict]:
    """(z, metadata) from ``save_noise``'s file; metadata values decoded ('model', 'class', 'prompt', ...)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise FileNotFoundError(f"noise file not found: {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            if "noise" not in f.keys():
                raise ValueError(f"{path} holds no 'noise' tensor (found {sorted(f.keys())}); "
                                 "was it written by starflow encode?")
            z = f.get_tensor("noise")
    except ValueError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ValueError(f"corrupt or unreadable noise file {path}: {e}") from e
    if meta.get("format") != NOISE_FORMAT:
        raise ValueError(f"{path} is not a starflow noise file (format {meta.get('format')!r}, expected {NOISE_FORMAT!r})")
    out = {}
    for k, v in meta.items():
        if k in ("format", "model"):
            out[k] = v
            continue
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    if not torch.isfinite(z).all():
        raise ValueError(f"{path}: the noise contains NaN or infinite values")
    return z, out


# ---------------------------------------------------------------------------------------------------
# user image files
# ---------------------------------------------------------------------------------------------------


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


def save_image(images: torch.Tensor, path: str) -> None:
    """One uint8 image [C, H, W] (or a batch, saved as a grid) to a PNG."""
    from starflow.io.images import check_finite_images, make_grid, save_pil, to_pil

    images = _as_batch(images)
    check_finite_images(images, f"images for {path}")
    save_pil(to_pil(images[0]) if images.shape[0] == 1 else make_grid(images), path)


__all__ = ["as_pipeline", "space", "encode", "decode", "decode_to_model_space", "round_trip_error", "image_nll",
           "to_model_space", "from_model_space", "pixels_to_float", "float_to_pixels", "save_noise", "load_noise",
           "load_image", "save_image", "notes", "check_images", "condition_args"]
