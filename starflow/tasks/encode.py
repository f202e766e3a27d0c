"""Exact encoding: an image -> its noise under the flow (through the autoencoder for latent models), and back.

A flow is invertible, so every image has exactly one noise tensor z = f(x),
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
  ``bpd = NLL(x) / (D ln 2) + 7`` with ``x = (pixel + U[0,1)) / 128 - 1`` (``starflow.data.spaces``); one seeded
  dequantisation draw per image (``samples`` > 1 averages several).
* latent models: nats/dim of the image's (posterior-mean) latents under the flow. This is a density of
  latents, not of pixels, so it is not comparable with pixel bits/dim; it still ranks images.

A model trained with Gaussian noise augmentation (``noise_std`` > 0) has the density of *noisy* data; its
likelihood at a clean image is what is reported (it still orders in- vs out-of-distribution images).

User image files (``load_image``, ``notes``) are read by ``starflow.tasks.image_files``.
"""
from __future__ import annotations

import json
import os

import torch

from starflow.components.autoencoder import images_to_float, images_to_uint8
from starflow.data.spaces import bin_centres, bins_to_uint8, bits_per_dim, dequantize
from starflow.io.hub import atomic_save_safetensors
from starflow.io.images import check_finite_images, make_grid, save_pil, to_pil
from starflow.pipeline import StarflowPipeline
from starflow.protocols import LikelihoodModel
from starflow.tasks.image_files import image_size_of, load_image, notes  # noqa: F401  (kept importable here)
from starflow.errors import NonFiniteError

NOISE_FORMAT = "starflow-noise-v1"


# ---------------------------------------------------------------------------------------------------
# The pipeline a user has, whatever they pass
# ---------------------------------------------------------------------------------------------------


def as_pipeline(model_or_pipe):
    """A ``StarflowPipeline`` from a pipeline, a bare STARFlow, or a model/pipeline directory."""
    if isinstance(model_or_pipe, StarflowPipeline):
        return model_or_pipe
    if isinstance(model_or_pipe, (str, os.PathLike)):
        return StarflowPipeline.from_pretrained(str(model_or_pipe))
    if isinstance(model_or_pipe, torch.nn.Module):
        return StarflowPipeline(model_or_pipe)
    raise TypeError(f"expected a StarflowPipeline, a STARFlow model or a directory, got {type(model_or_pipe).__name__}")


def _flow(pipe):
    model = pipe.model
    if not isinstance(model, LikelihoodModel):
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
        return bin_centres(images)

    return images_to_float(images)


def float_to_pixels(pipe, x: torch.Tensor) -> torch.Tensor:
    if pipe.autoencoder is None:
        return bins_to_uint8(x)

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

    total = torch.zeros(images.shape[0], dtype=torch.float64)
    for _ in range(samples):
        x = dequantize(images, generator=generator)
        total += bits_per_dim(model.nll(x, labels, text)).double().cpu()
    return (total / samples).float(), "bits/dim"


def image_bits_map(pipe, images: torch.Tensor, y=None, prompt=None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Where an image's bits go: ``STARFlow.nll_map`` of the dequantised 8-bit images in bits, [B, C, H, W]
    (its mean over an image is that image's bits/dim). Pixel models only."""
    pipe = as_pipeline(pipe)
    if pipe.autoencoder is not None:
        raise ValueError("a bits map needs a pixel-space model; a latent model's dimensions are latents, not pixels")
    images = check_images(pipe, images).to(pipe.device)
    labels, text = condition_args(pipe, images.shape[0], y, prompt)
    with torch.no_grad():
        return bits_per_dim(_flow(pipe).nll_map(dequantize(images, generator=generator), labels, text)).cpu()


# ---------------------------------------------------------------------------------------------------
# noise files
# ---------------------------------------------------------------------------------------------------


def save_noise(path: str, z: torch.Tensor, model_dir: str | None = None, y=None, prompt=None, **extra) -> None:
    """Write z to a safetensors file; metadata records the model and the condition used."""
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


def save_image(images: torch.Tensor, path: str) -> None:
    """One uint8 image [C, H, W] (or a batch, saved as a grid) to a PNG."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images = _as_batch(images)
    check_finite_images(images, f"images for {path}")
    save_pil(to_pil(images[0]) if images.shape[0] == 1 else make_grid(images), path)


__all__ = ["as_pipeline", "space", "encode", "decode", "decode_to_model_space", "round_trip_error", "image_nll",
           "to_model_space", "from_model_space", "pixels_to_float", "float_to_pixels", "save_noise", "load_noise",
           "load_image", "save_image", "notes", "check_images", "condition_args"]
