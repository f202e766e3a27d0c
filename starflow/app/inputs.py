"""The demo's limits and input checks (each raises gr.Error with a message the user sees), image helpers,
and the offline environment Gradio is imported under."""
from __future__ import annotations

import math
import os
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGES = 16
MAX_PROMPT_CHARS = 200
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
MAX_UPLOAD_TOTAL_BYTES = 64 * 1024 * 1024  # all uploads kept in Gradio's temp folder together
MAX_UPLOAD_AGE_S = 3600                    # uploads older than this are removed
MAX_GUIDANCE = 20.0
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 2.0
MAX_SEED = 2**31 - 1
MAX_INPAINT_STEPS = 20
SAMPLERS = ("sequential", "jacobi")
CHUNK = 4               # images per model call; progress is reported per chunk
DISPLAY_SIDE = 128      # tiny model images are shown upscaled (nearest) to at least this side
EDITOR_SIDE = 256       # the inpainting canvas side
DEFAULT_CONCURRENCY = 1
DEFAULT_QUEUE_SIZE = 32
MASK_PRESETS = ("painted", "left half", "right half", "top half", "bottom half", "centre square")
NOT_AVAILABLE_INPAINT = ("Inpainting is not available in this installation: the module `starflow.tasks.inpaint` "
                         "(function `inpaint(pipe, image, mask, ...)`) is missing.")


def offline_env(temp_dir: str | None = None) -> None:
    """Environment for a Gradio process with no network: call before importing gradio."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if temp_dir:
        os.environ["GRADIO_TEMP_DIR"] = temp_dir


offline_env()
import gradio as gr  # noqa: E402  (after the offline environment)

# Gradio decodes some inputs itself (the inpainting editor's background) before a handler can check them:
# with Pillow's bomb limit at our pixel limit, an image over twice MAX_UPLOAD_PIXELS is refused from its
# header instead of being decoded (a 164 KB PNG can declare 13000x13000 pixels).
Image.MAX_IMAGE_PIXELS = min(Image.MAX_IMAGE_PIXELS or MAX_UPLOAD_PIXELS, MAX_UPLOAD_PIXELS)


def upload_dir() -> str:
    """Where Gradio keeps uploaded files."""
    return os.environ.get("GRADIO_TEMP_DIR") or os.path.join(tempfile.gettempdir(), "gradio")


def enforce_upload_budget(folder: str | None = None, keep: str | None = None) -> int:
    """Bound the uploads kept on disk: remove files older than ``MAX_UPLOAD_AGE_S``, then the oldest until
    the total is within ``MAX_UPLOAD_TOTAL_BYTES`` (never ``keep``, the upload being handled). Returns the
    bytes left. Empty folders Gradio made per upload are removed too."""
    folder = folder or upload_dir()
    if not os.path.isdir(folder):
        return 0
    keep = os.path.abspath(keep) if keep else None
    files, now = [], time.time()
    for dirpath, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(dirpath, n)
            try:
                st = os.stat(path)
            except OSError:
                continue
            files.append((st.st_mtime, st.st_size, path))
    files.sort()
    total = sum(size for _, size, _ in files)
    for mtime, size, path in files:
        if os.path.abspath(path) == keep:
            continue
        if total <= MAX_UPLOAD_TOTAL_BYTES and now - mtime <= MAX_UPLOAD_AGE_S:
            break
        try:
            os.remove(path)
            total -= size
        except OSError:
            pass
    for dirpath, dirnames, names in os.walk(folder, topdown=False):
        if dirpath != folder and not dirnames and not names:
            try:
                os.rmdir(dirpath)
            except OSError:
                pass
    return total


def check_pixels(img) -> None:
    """Refuse an image (PIL or array) above ``MAX_UPLOAD_PIXELS`` before any work is done on it."""
    w, h = (img.width, img.height) if isinstance(img, Image.Image) else (np.shape(img)[1], np.shape(img)[0])
    if w * h > MAX_UPLOAD_PIXELS:
        raise gr.Error(f"The image is {w}x{h}; the limit is {MAX_UPLOAD_PIXELS:,} pixels.")


# ---------------------------------------------------------------------------------------------------
# input checks (each raises gr.Error with a message the user sees)
# ---------------------------------------------------------------------------------------------------
def check_prompt(prompt) -> str:
    if not isinstance(prompt, str) or not prompt.strip():
        raise gr.Error("Please enter a prompt.")
    prompt = " ".join(prompt.split())
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(f"The prompt is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}.")
    return prompt


def check_int(value, name: str, lo: int, hi: int) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.") from None
    if not math.isfinite(f) or f != int(f):
        raise gr.Error(f"{name} must be a whole number, got {value!r}.")
    if not lo <= int(f) <= hi:
        raise gr.Error(f"{name} must be between {lo} and {hi}, got {int(f)}.")
    return int(f)


def check_float(value, name: str, lo: float, hi: float) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise gr.Error(f"{name} must be a number, got {value!r}.") from None
    if not (math.isfinite(f) and lo <= f <= hi):
        raise gr.Error(f"{name} must be between {lo} and {hi}, got {value!r}.")
    return f


def check_choice(value, name: str, choices) -> str:
    if value not in choices:
        raise gr.Error(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
    return value


def _guidance_rules() -> tuple[str, ...]:
    from starflow.flow.guidance import RULES  # lazy: the demo imports models and image code on first use

    return tuple(RULES)


def _file_path(upload) -> str | None:
    """A gr.File / gr.Image(type='filepath') value, a FileData-like dict or a plain path -> path."""
    if upload is None:
        return None
    if isinstance(upload, dict):
        upload = upload.get("path") or upload.get("name")
    elif not isinstance(upload, (str, os.PathLike)):
        upload = getattr(upload, "path", None) or getattr(upload, "name", None)
    return None if upload is None else str(upload)


def load_upload(upload) -> Image.Image:
    """Open an uploaded file as an image, enforcing the size limits; non-images raise gr.Error."""
    if isinstance(upload, Image.Image):
        img = upload
    else:
        path = _file_path(upload)
        if not path:
            raise gr.Error("Please upload an image (or pick an example).")
        if not os.path.isfile(path):
            raise gr.Error("The uploaded file could not be found; please upload it again.")
        size = os.path.getsize(path)
        if os.path.abspath(path).startswith(os.path.abspath(upload_dir()) + os.sep):
            enforce_upload_budget(keep=path)
        if size > MAX_UPLOAD_BYTES:
            raise gr.Error(f"The file is {size / 2**20:.1f} MB; the limit is {MAX_UPLOAD_BYTES / 2**20:.0f} MB.")
        name = os.path.basename(path)
        try:
            with Image.open(path) as probe:
                probe.verify()
            img = Image.open(path)
            if img.width * img.height > MAX_UPLOAD_PIXELS:
                raise gr.Error(f"The image is {img.width}x{img.height}; the limit is {MAX_UPLOAD_PIXELS:,} pixels.")
            img.load()
        except gr.Error:
            raise
        except (Image.UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError):
            raise gr.Error(f"'{name}' is not an image this app can read (PNG, JPEG, GIF, BMP, WebP, ...).") from None
    check_pixels(img)
    return img


def to_model_image(img: Image.Image, shape: tuple[int, int, int]) -> tuple[torch.Tensor, str]:
    """A PIL image -> uint8 [1, C, H, W] in the model's mode and size, and a note on what was changed.

    Transparency is composited on black (the background of both shipped datasets); a non-square image is
    centre-cropped to a square; resizing uses a box filter (area average) down and bicubic up."""
    C, H, W = shape
    notes = []
    img = ImageOps.exif_transpose(img) if hasattr(ImageOps, "exif_transpose") else img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(bg, rgba)
        notes.append("transparency composited on black")
    mode = "L" if C == 1 else "RGB"
    if img.mode != mode:
        notes.append(f"converted {img.mode} -> {mode}")
        img = img.convert(mode)
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
        notes.append(f"centre-cropped {w}x{h} -> {side}x{side}")
    if img.size != (W, H):
        resample = Image.BOX if img.width >= W else Image.BICUBIC
        notes.append(f"resized {img.width}x{img.height} -> {W}x{H}")
        img = img.resize((W, H), resample)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    note = "Input used as is." if not notes else "Input " + "; ".join(notes) + " (the model's size and mode)."
    return torch.from_numpy(arr.copy())[None], note


def upscale(img: Image.Image, side: int = DISPLAY_SIDE) -> Image.Image:
    """Nearest-neighbour upscale by an integer factor so tiny images are visible in the browser."""
    k = max(1, side // max(img.size))
    return img if k == 1 else img.resize((img.width * k, img.height * k), Image.NEAREST)


def noise_to_image(z: torch.Tensor) -> Image.Image:
    """Noise [C, H, W] -> a picture: -3 maps to black, +3 to white; 1 or 3 channels directly, other
    channel counts side by side as grey tiles."""
    from starflow.io.images import make_grid, to_pil  # lazy: the demo imports models and image code on first use

    u = ((z.float().clamp(-3, 3) + 3) / 6 * 255).round().to(torch.uint8)
    if u.shape[0] in (1, 3):
        return to_pil(u)
    return make_grid(u[:, None], nrow=u.shape[0])


def _progress(progress, frac: float, desc: str) -> None:
    if progress is not None:
        try:
            progress(frac, desc=desc)
        except Exception:  # outside a Gradio event there is nothing to report to
            pass
