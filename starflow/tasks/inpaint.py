"""Training-free inpainting with an invertible flow: iterative resampling.

Given an image, a binary mask (True / white = regenerate) and optionally a class or a prompt:

1. Map the image to the model's space: [-1, 1] pixels, or normalised latents through the autoencoder.
   Masked positions start at a neutral fill (the mean of the known pixels per channel; 0 for latents).
2. Repeat ``steps`` times:
     z = flow(x)                               (exact noise of the current composite)
     z[unknown tokens] = fresh N(0, T² prior_var) noise
     x' = flow^-1(z | condition)               (the known tokens' noise now carries the context)
     x = x' where the model-space mask is set, else the known values (paste back).
   With ``noisy_known`` the known region is pasted with fresh N(0, noise_std²) noise each round, as the flow
   saw data in training (models trained with noise augmentation); on the shipped MNIST model this gave no
   gain (200 train-split digits, half masked), so it is off by default.
3. Clean the sample like ``StarflowPipeline.finish`` (Tweedie step for models trained on noisy data),
   decode latents, and composite in pixel space: unmasked pixels are copied from the input, masked ones
   come from the model.

Mask mapping (documented rule, also right for masks not aligned to any grid):

* A model-space *cell* is unknown if ANY pixel of its receptive patch is masked. For a pixel model the
  cell is the pixel itself; for a latent model with downsampling factor d it is the d x d pixel block
  the latent position covers (``cell_mask``). Paste-back (step 2) uses this cell mask.
* A flow *token* (a p x p patch of cells, p = the flow's patch size) is unknown if ANY of its cells is
  unknown (``token_mask``); fresh noise goes to every unknown token. So a token with one masked pixel
  in a corner is regenerated; for pixel models its unmasked pixels are pasted back after each step.
* ``dilate`` (latent models) grows the cell mask by that many latent cells: an autoencoder's decoder
  has a receptive field wider than d pixels, so latents next to the hole also influence it.

Unmasked pixels in the output: exactly the input bytes (``blend="paste"``, the default, both spaces).
With ``blend="decoded"`` a latent model's output is the decoder's image everywhere: the known latents are
exactly the input's, but a convolutional/attention decoder is not local (measured on the shipped MNIST
autoencoder: changing one of its 7x7 latent cells moves pixels across the whole image, up to ~40 levels
well away from the cell), so unmasked pixels then match the input only up to the reconstruction error plus
that spill-over. "paste" can leave a seam at the mask border; "decoded" cannot.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from starflow.components.postprocess import denoise_and_decode
from starflow.errors import LimitError
from starflow.protocols import TokenFlow
from starflow.tasks.encode import as_pipeline, check_images, condition_args, float_to_pixels, pixels_to_float
from starflow.tasks.image_files import image_size_of, load_image

BLENDS = ("paste", "decoded")
MAX_STEPS = 1000  # resampling rounds; each is a full encode + decode, so more is a runaway request


@dataclass
class InpaintResult:
    images: torch.Tensor        # uint8 [B, C, H, W], the composites
    model_space: torch.Tensor   # [B, c, h, w] final model-space sample (pixels in [-1,1] or latents), before cleaning
    cell_mask: torch.Tensor     # [B, 1, h, w] bool, model-space positions that were regenerated
    token_mask: torch.Tensor    # [B, L] bool, flow tokens that received fresh noise (canonical order)
    pixel_mask: torch.Tensor    # [B, 1, H, W] bool, the binary pixel mask used


# ---------------------------------------------------------------------------------------------------
# masks
# ---------------------------------------------------------------------------------------------------


def binarize_mask(mask, threshold: float = 0.5) -> torch.Tensor:
    """A mask as bool [B, H, W] or [H, W]: True = regenerate. uint8 masks are read as 0..255, floats as
    0..1; a mask with values other than 0 and 1 (or 0 and 255) is thresholded at 0.5 with a warning."""
    m = torch.as_tensor(mask)
    if m.dtype == torch.bool:
        return m
    if m.dtype == torch.uint8:
        v = m.float() / 255.0
    elif m.is_floating_point() or m.dtype in (torch.int16, torch.int32, torch.int64):
        v = m.float()
        if not torch.isfinite(v).all():
            raise ValueError("mask contains NaN or infinite values")
        if v.min() < 0 or v.max() > 1:
            raise ValueError(f"float masks must be in [0, 1] (uint8 masks in 0..255), got range "
                             f"[{v.min().item():.3g}, {v.max().item():.3g}]")
    else:
        raise ValueError(f"unsupported mask dtype {m.dtype}")
    binary = (v == 0) | (v == 1)
    if not bool(binary.all()):
        levels = int(torch.unique(v).numel())
        warnings.warn(f"mask is not binary ({levels} distinct levels); thresholded at {threshold} "
                      f"(>= {threshold} = regenerate)", UserWarning, stacklevel=2)
    return v >= threshold


def _any_pool(mask: torch.Tensor, k: int) -> torch.Tensor:
    """bool [B, 1, H, W] -> bool [B, 1, H/k, W/k]: a cell is set if any of its k x k inputs is."""
    if k == 1:
        return mask.clone()
    H, W = mask.shape[-2:]
    if H % k or W % k:
        raise ValueError(f"mask of size {H}x{W} is not divisible into {k}x{k} cells")
    return F.max_pool2d(mask.float(), k).bool()


def cell_mask(pixel_mask: torch.Tensor, downsample: int, dilate: int = 0) -> torch.Tensor:
    """bool [B, 1, H, W] pixel mask -> [B, 1, H/d, W/d] model-space mask (ANY pixel of a cell's d x d
    receptive patch masked), optionally dilated by ``dilate`` cells (8-connected)."""
    m = _any_pool(pixel_mask, downsample)
    if dilate > 0:
        m = F.max_pool2d(m.float(), 2 * dilate + 1, stride=1, padding=dilate).bool()
    return m


def token_mask(cells: torch.Tensor, patch_size: int) -> torch.Tensor:
    """bool [B, 1, h, w] model-space mask -> [B, L] token mask (ANY cell of a token's p x p patch), tokens
    in the flow's canonical row-major order (the order of ``STARFlow.patchify``)."""
    return _any_pool(cells, patch_size).flatten(1)


def load_mask(path: str, image_path: str | None = None, size: int | None = None) -> torch.Tensor:
    """A mask PNG -> bool [size, size] (white = regenerate). Its size must equal the image file's; when
    the image is resized to the model's size, the binary mask is resized with the ANY rule (a resized pixel
    is masked if any source pixel under it is)."""
    from PIL import Image

    mw, mh = image_size_of(path)
    if image_path is not None:
        iw, ih = image_size_of(image_path)
        if (mw, mh) != (iw, ih):
            raise ValueError(f"mask {path} is {mw}x{mh} but image {image_path} is {iw}x{ih}; they must be the same size")
    if mw != mh:
        raise ValueError(f"mask {path} is {mw}x{mh}; masks (like images) must be square")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # mode-conversion notes are noise for a mask
        arr = load_image(path, 1, mw, what="mask", resize=False)[0]
    m = binarize_mask(arr)
    if size is not None and m.shape[-1] != size:
        # resize with the ANY rule: box-average the binary mask and keep every pixel with any coverage
        im = Image.fromarray(m.numpy().astype(np.uint8) * 255, mode="L").resize((size, size), Image.BOX)
        m = torch.from_numpy(np.asarray(im) > 0)
    return m


# ---------------------------------------------------------------------------------------------------
# inpainting
# ---------------------------------------------------------------------------------------------------


def _prepare_masks(pipe, images: torch.Tensor, mask) -> torch.Tensor:
    B, _, H, W = images.shape
    m = binarize_mask(mask) if not (isinstance(mask, torch.Tensor) and mask.dtype == torch.bool) else mask
    if m.ndim == 2:
        m = m[None].expand(B, -1, -1)
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3:
        raise ValueError(f"mask must be [H, W], [B, H, W] or [B, 1, H, W], got shape {tuple(m.shape)}")
    if tuple(m.shape[-2:]) != (H, W):
        raise ValueError(f"mask is {m.shape[-1]}x{m.shape[-2]} but the image is {W}x{H}; they must be the same size")
    if m.shape[0] != B:
        raise ValueError(f"got {m.shape[0]} masks for {B} images")
    return m[:, None].to(pipe.device)


@torch.no_grad()
def inpaint(pipe, images: torch.Tensor, mask, y=None, prompt=None, steps: int = 5, guidance: float = 0.0,
            guidance_rule: str = "starflow", temperature: float = 1.0, generator: torch.Generator | None = None,
            blend: str = "paste", dilate: int = 0, denoise: bool = True, noisy_known: bool = False) -> InpaintResult:
    """Inpaint uint8 images [B, C, H, W] (or one [C, H, W]) where ``mask`` ([H, W] or [B, H, W]; bool,
    uint8 0/255 or float 0/1; True = regenerate) is set. ``y``: class label(s); ``prompt``: text(s).
    ``steps``: resampling rounds (>= 1). Returns an :class:`InpaintResult`."""
    pipe = as_pipeline(pipe)
    model = pipe.model
    if not isinstance(model, TokenFlow):
        raise ValueError(f"{type(model).__name__} is not an invertible flow; inpainting needs a STARFlow model")
    if not 1 <= steps <= MAX_STEPS:
        raise LimitError(f"steps (resampling rounds) must be between 1 and {MAX_STEPS}, got {steps}")
    if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if blend not in BLENDS:
        raise ValueError(f"blend must be one of {BLENDS}, got {blend!r}")
    if dilate < 0:
        raise ValueError(f"dilate must be >= 0, got {dilate}")
    images = check_images(pipe, images).to(pipe.device)
    pm = _prepare_masks(pipe, images, mask)                       # [B, 1, H, W] bool
    B = images.shape[0]
    labels, text = condition_args(pipe, B, y, prompt)
    ae = pipe.autoencoder
    pix = pixels_to_float(pipe, images)                            # the input in [-1, 1]
    if ae is None:
        known = pix
        cells = pm.clone()
        if dilate:
            cells = cell_mask(pm, 1, dilate)
    else:
        known = ae.encode(pix).float()
        cells = cell_mask(pm, ae.downsample, dilate)
    tokens = token_mask(cells, model.config.patch_size)            # [B, L]
    if not bool(pm.any()):
        warnings.warn("the mask is empty; nothing to inpaint", UserWarning, stacklevel=2)
        return InpaintResult(images.cpu(), known.cpu(), cells.cpu(), tokens.cpu(), pm.cpu())

    cm = cells.expand_as(known)
    if ae is None:  # neutral start: the mean of each image's known pixels, per channel
        w = (~cm).float()
        fill = (known * w).sum((2, 3), keepdim=True) / w.sum((2, 3), keepdim=True).clamp_min(1)
    else:
        fill = torch.zeros_like(known[:, :, :1, :1])
    x = torch.where(cm, fill.expand_as(known), known)
    std = temperature * model.prior_var.sqrt()                     # [L, D]
    tok = tokens[:, :, None]
    sigma = pipe.noise_std if noisy_known else 0.0

    def randn(shape):
        return torch.randn(shape, generator=generator, device=generator.device if generator else known.device).to(known.device)

    for _ in range(steps):
        if sigma > 0:  # the known region as the flow saw data in training: with its noise
            x = torch.where(cm, x, known + sigma * randn(known.shape))
        z = model.patchify(model(x, labels, text)[0])
        z = torch.where(tok, randn(z.shape) * std, z)
        x_new = model.inverse(model.unpatchify(z), labels, text, guidance=guidance, guidance_rule=guidance_rule)
        x = torch.where(cm, x_new, known)
    sample = x
    out = denoise_and_decode(x, pipe.denoise if denoise else "none", pipe.noise_std,
                             lambda v: model.log_prob(v, labels, text), ae, keep=(~cm, known))
    if blend == "paste":
        out = torch.where(pm.expand_as(out), out, pix)
    return InpaintResult(float_to_pixels(pipe, out).cpu(), sample.cpu(), cells.cpu(), tokens.cpu(), pm.cpu())


__all__ = ["InpaintResult", "inpaint", "binarize_mask", "cell_mask", "token_mask", "load_mask"]
