"""The browser demo: a Gradio Blocks app over one or two saved pipelines.

    starflow serve                                  # shipped models, http://127.0.0.1:7860
    starflow serve --checkpoint runs/x/model --text-checkpoint runs/y/model --port 8000

From Python (tests, notebooks)::

    from starflow.app import Demo, build_app, launch
    demo = Demo(text=pipe_or_dir, digits=pipe_or_dir)     # either may be None
    blocks = build_app(demo)                              # a gr.Blocks, queue configured
    launch(blocks, host="127.0.0.1", port=7860)

Tabs
----
* **Text to image** (text-conditional model): prompt, number of images (<= ``MAX_IMAGES``), guidance
  weight and rule, temperature, seed, sampler (sequential | jacobi) -> gallery.
* **Digits** (class-conditional model): class 0-9 -> one grid.
* **Inpainting**: upload an image or pick an example, paint the region to regenerate (or pick a preset
  mask) -> completions, through ``starflow.inpaint.inpaint`` when that module exists; otherwise the tab
  says it is not available.
* **Encode -> decode** (flows): an image -> its exact noise z = f(x), the round trip f^-1(f(x)), the
  largest round-trip error and the image's bits/dim (pixel models; latent models report nats/dim of the
  latent, and the autoencoder's own, lossy, reconstruction error separately).

Limits (module constants): ``MAX_IMAGES`` per request, ``MAX_PROMPT_CHARS``, ``MAX_UPLOAD_BYTES`` (also
passed to Gradio as ``max_file_size``, so larger uploads are refused before they reach a handler),
``MAX_UPLOAD_PIXELS``. Uploads that are not images are refused with a message (``gr.Error``). Images are
converted to the model's mode and size (centre crop to a square, then a box-filter resize) and the tab
says so. All model work shares one queue slot group (``concurrency_id="model"``) with a bounded
concurrency and a bounded queue: concurrent requests wait their turn rather than run the model at once;
a request beyond ``queue_size`` waiting ones is refused with Gradio's "queue full" message.

Offline: :func:`offline_env` sets ``GRADIO_ANALYTICS_ENABLED=False`` and ``HF_HUB_OFFLINE=1`` (unless
already set) before Gradio is imported; the theme uses system fonts only (no font download) and
``share`` is always False.
"""
from __future__ import annotations

import math
import os
import threading
import time

import numpy as np
import torch
from PIL import Image, ImageOps

MAX_IMAGES = 16
MAX_PROMPT_CHARS = 200
MAX_UPLOAD_BYTES = 4 * 1024 * 1024
MAX_UPLOAD_PIXELS = 4096 * 4096
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
NOT_AVAILABLE_INPAINT = ("Inpainting is not available in this installation: the module `starflow.inpaint` "
                         "(function `inpaint(pipe, image, mask, ...)`) is missing.")


def offline_env(temp_dir: str | None = None) -> None:
    """Environment for a Gradio process with no network: call before importing gradio."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if temp_dir:
        os.environ["GRADIO_TEMP_DIR"] = temp_dir


offline_env()
import gradio as gr  # noqa: E402  (after the offline environment)


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
    from starflow.guidance import RULES

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
    if img.width * img.height > MAX_UPLOAD_PIXELS:
        raise gr.Error(f"The image is {img.width}x{img.height}; the limit is {MAX_UPLOAD_PIXELS:,} pixels.")
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
    from starflow.images import make_grid, to_pil

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


# ---------------------------------------------------------------------------------------------------
# the models behind the tabs
# ---------------------------------------------------------------------------------------------------
class Slot:
    """A pipeline given as an object or a directory, loaded on first use; ``missing`` says why not."""

    def __init__(self, source, role: str, device="cpu"):
        self.source, self.role, self.device = source, role, device
        self._pipe = source if source is not None and not isinstance(source, (str, os.PathLike)) else None
        self.missing = None
        if source is None:
            self.missing = f"No {role} model was given."
        elif self._pipe is None and not os.path.isdir(str(source)):
            self.missing = f"The {role} model directory {str(source)!r} does not exist (yet)."
        self._load_lock = threading.Lock()

    @property
    def available(self) -> bool:
        return self.missing is None

    def get(self):
        if self.missing:
            raise gr.Error(self.missing)
        with self._load_lock:
            if self._pipe is None:
                from starflow.pipeline import StarflowPipeline

                self._pipe = StarflowPipeline.from_pretrained(str(self.source), device=self.device)
        return self._pipe


def _sampler_kwargs(pipe, temperature: float, rule: str, sampler: str) -> dict:
    if getattr(pipe.model, "model_type", "starflow") != "starflow":  # peers: Euler sampler only
        return {}
    return {"temperature": temperature, "guidance_rule": rule, "sampler": sampler}


class Demo:
    """What the tabs call. Each handler checks its inputs, then runs the model under one lock."""

    def __init__(self, text=None, digits=None, device="cpu"):
        self.text = Slot(text, "text-to-image", device)
        self.digits = Slot(digits, "class-conditional (digits)", device)
        self.lock = threading.Lock()  # one model call at a time, whatever the queue allows
        self._examples: dict[str, Image.Image] | None = None

    @classmethod
    def from_dirs(cls, checkpoint: str | None = None, text_checkpoint: str | None = None, device="cpu"):
        """Load the given directories now and route each by what it is: a text-conditional model to the
        text tab, anything else to the digits tab."""
        from starflow.pipeline import StarflowPipeline

        text = digits = None
        for path in (checkpoint, text_checkpoint):
            if path is None:
                continue
            if not os.path.isdir(path):
                raise FileNotFoundError(f"model directory {path!r} does not exist")
            pipe = StarflowPipeline.from_pretrained(path, device=device)
            if pipe.is_text_conditional:
                if text is not None:
                    raise ValueError("two text-conditional models given; pass one class-conditional --checkpoint")
                text = pipe
            else:
                if digits is not None:
                    raise ValueError("two models without text conditioning given; --text-checkpoint must be text-conditional")
                digits = pipe
        return cls(text=text, digits=digits, device=device)

    # ---- which model a tab uses ------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        out = []
        if self.digits.available:
            out.append("digits")
        if self.text.available:
            out.append("text")
        return out

    def _slot(self, which: str) -> Slot:
        check_choice(which, "Model", ("digits", "text"))
        return self.digits if which == "digits" else self.text

    def _condition(self, pipe, label, prompt):
        """-> (y, prompt) for one image of this model."""
        if pipe.is_text_conditional:
            return None, check_prompt(prompt)
        if pipe.num_classes:
            return torch.tensor([check_int(label, "Class", 0, pipe.num_classes - 1)]), None
        return None, None

    # ---- Text to image ---------------------------------------------------------------------------------
    def text_to_image(self, prompt, num_images=4, guidance=1.0, rule="starflow", temperature=1.0, seed=0,
                      sampler="sequential", progress=None):
        prompt = check_prompt(prompt)
        n = check_int(num_images, "Number of images", 1, MAX_IMAGES)
        w = check_float(guidance, "Guidance weight", 0.0, MAX_GUIDANCE)
        rule = check_choice(rule, "Guidance rule", _guidance_rules())
        t = check_float(temperature, "Temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        seed = check_int(seed, "Seed", 0, MAX_SEED)
        sampler = check_choice(sampler, "Sampler", SAMPLERS)
        pipe = self.text.get()
        if not pipe.is_text_conditional:
            raise gr.Error("The loaded model is not text-conditional.")
        images, dt = self._sample(pipe, n, seed, progress, prompt=prompt, guidance=w,
                                  **_sampler_kwargs(pipe, t, rule, sampler))
        return [(upscale(im), f"{prompt} · seed {seed} · #{i}") for i, im in enumerate(images)], \
            f"{n} images in {dt:.2f} s ({sampler}, w={w:g}, {rule} rule, T={t:g}); shown upscaled (nearest)."

    # ---- Digits ------------------------------------------------------------------------------------------
    def digits_grid(self, label, num_images=16, guidance=1.0, rule="starflow", temperature=1.0, seed=0,
                    sampler="sequential", progress=None):
        from starflow.images import make_grid

        n = check_int(num_images, "Number of images", 1, MAX_IMAGES)
        w = check_float(guidance, "Guidance weight", 0.0, MAX_GUIDANCE)
        rule = check_choice(rule, "Guidance rule", _guidance_rules())
        t = check_float(temperature, "Temperature", MIN_TEMPERATURE, MAX_TEMPERATURE)
        seed = check_int(seed, "Seed", 0, MAX_SEED)
        sampler = check_choice(sampler, "Sampler", SAMPLERS)
        pipe = self.digits.get()
        label = check_int(label, "Class", 0, max(pipe.num_classes - 1, 0))
        y = torch.full((n,), label, dtype=torch.long) if pipe.num_classes else None
        images, dt = self._sample(pipe, n, seed, progress, y=y, guidance=w, as_tensor=True,
                                  **_sampler_kwargs(pipe, t, rule, sampler))
        what = f"class {label}" if pipe.num_classes else "unconditional"
        return upscale(make_grid(images, nrow=min(n, 4)), 4 * DISPLAY_SIDE), \
            f"{n} samples ({what}) in {dt:.2f} s ({sampler}, w={w:g}, {rule} rule, T={t:g})."

    def _sample(self, pipe, n, seed, progress, y=None, prompt=None, guidance=0.0, as_tensor=False, **kw):
        from starflow.images import to_pil

        if guidance:
            kw["guidance"] = guidance
        g = torch.Generator(pipe.device).manual_seed(seed)
        out, t0 = [], time.time()
        _progress(progress, 0.0, "sampling")
        with self.lock, torch.no_grad():
            for start in range(0, n, CHUNK):
                m = min(CHUNK, n - start)
                yy = None if y is None else y[start:start + m]
                try:
                    x = pipe.sample(m, y=yy, prompt=prompt, generator=g, **kw)
                except ValueError as e:
                    raise gr.Error(str(e)) from None
                out.append(x.cpu())
                _progress(progress, (start + m) / n, f"sampled {start + m}/{n}")
        images = torch.cat(out)
        dt = time.time() - t0
        return (images if as_tensor else [to_pil(im) for im in images]), dt

    # ---- Encode -> decode ----------------------------------------------------------------------------------
    def encode_decode(self, upload, which="digits", label=0, prompt="", progress=None):
        """-> (input as the model sees it, noise image, round trip, markdown report). Uses starflow.encode."""
        from starflow import encode as E
        from starflow.images import to_pil

        slot = self._slot(which)
        img = load_upload(upload)
        pipe = slot.get()
        if not (hasattr(pipe.model, "log_prob") and hasattr(pipe.model, "inverse")):
            raise gr.Error(f"{type(pipe.model).__name__} has no exact inverse; encoding needs a flow.")
        x8, note = to_model_image(img, pipe.image_shape)
        y, prompt = self._condition(pipe, label, prompt)
        y = None if y is None else int(y[0])
        _progress(progress, 0.1, "encoding")
        with self.lock, torch.no_grad():
            try:
                x = E.to_model_space(pipe, x8)
                z = E.encode(pipe, x8, y, prompt)
                _progress(progress, 0.4, "decoding")
                x2 = E.decode_to_model_space(pipe, z, y, prompt)
                recon8 = E.float_to_pixels(pipe, E.from_model_space(pipe, x2)).cpu()
                _progress(progress, 0.8, "likelihood")
                g = torch.Generator(pipe.device).manual_seed(0)
                nll, unit = E.image_nll(pipe, x8, y, prompt, samples=4, generator=g)
                rec_ae = None
                if pipe.autoencoder is not None:
                    rec_ae = (E.float_to_pixels(pipe, E.from_model_space(pipe, x)).cpu().int() - x8.int()).abs().max().item()
            except ValueError as e:
                raise gr.Error(str(e)) from None
        flow_err = (x2 - x).abs().max().item()
        pix_err = (recon8.int() - x8.int()).abs().max().item()
        where = "[-1, 1] pixel units" if pipe.autoencoder is None else "latent units"
        lines = [note, f"**Round trip** f⁻¹(f(x)): max |error| = {flow_err:.2e} in {where}; "
                       f"decoded image differs from the input by at most {pix_err} of 255 grey levels."]
        if rec_ae is not None:
            lines.append(f"The autoencoder alone (lossy, not the flow) reconstructs the input to within {rec_ae} levels.")
        if unit == "bits/dim":
            lines.append(f"**Bits/dim**: {nll.item():.3f} (uniform dequantisation, mean of 4 draws).")
        else:
            lines.append(f"**Likelihood**: {nll.item():.4f} nats/dim of the latent (pixel bits/dim is not defined "
                         "for a latent model).")
        if getattr(pipe, "noise_std", 0):
            lines.append(f"The model was trained on data with Gaussian noise σ={pipe.noise_std:g}; this is its "
                         "density at the clean image.")
        zs = z[0].float().cpu()
        lines.append(f"**Noise** z: mean {zs.mean().item():+.3f}, std {zs.std().item():.3f} (the likelihood's prior "
                     "is a standard normal); shown with ±3 as black/white.")
        cond = f"class {y}" if y is not None else (f"prompt '{prompt}'" if prompt else "no condition")
        lines.append(f"Conditioned on {cond}.")
        _progress(progress, 1.0, "done")
        return upscale(to_pil(x8[0])), upscale(noise_to_image(zs)), upscale(to_pil(recon8[0])), "\n\n".join(lines)

    # ---- Inpainting --------------------------------------------------------------------------------------
    @staticmethod
    def inpaint_available() -> bool:
        import importlib.util

        try:
            return importlib.util.find_spec("starflow.inpaint") is not None
        except (ImportError, ValueError):
            return False

    def examples(self) -> dict[str, Image.Image]:
        """A few example images per available model: real test-split images of its dataset."""
        if self._examples is None:
            ex = {}
            if self.digits.available:
                try:
                    from starflow.data.digits import load_mnist_subset

                    imgs, labels = load_mnist_subset("test")
                    for k in range(3):
                        i = int(np.flatnonzero(labels == k * 3)[0])
                        ex[f"MNIST test digit ({int(labels[i])})"] = Image.fromarray(np.asarray(imgs[i], np.uint8).reshape(28, 28), "L")
                except Exception:  # the example set is a convenience; uploads still work
                    pass
            if self.text.available:
                try:
                    from starflow.data.shapes import ShapesDataset

                    ds = ShapesDataset("test", size=3)
                    for i in range(3):
                        im, cap = ds[i]
                        ex[f"shapes: {cap}"] = Image.fromarray(im.numpy().transpose(1, 2, 0), "RGB")
                except Exception:
                    pass
            self._examples = ex
        return self._examples

    def example(self, name):
        if not name:
            return None
        ex = self.examples()
        if name not in ex:
            raise gr.Error(f"Unknown example {name!r}.")
        return ex[name]

    def editor_value(self, upload, which="digits"):
        """An upload (or example) -> the inpainting canvas: the image at the model's size, upscaled."""
        img = load_upload(upload)
        pipe = self._slot(which).get()
        x8, note = to_model_image(img, pipe.image_shape)
        from starflow.images import to_pil

        bg = upscale(to_pil(x8[0]).convert("RGB"), EDITOR_SIDE)
        return {"background": bg, "layers": [], "composite": bg}, note + " Paint the region to regenerate."

    @staticmethod
    def mask_from(editor, shape_hw: tuple[int, int], preset: str = "painted") -> torch.Tensor:
        """The region to regenerate as bool [H, W]: painted strokes (any layer's alpha) or a preset."""
        H, W = shape_hw
        check_choice(preset, "Mask", MASK_PRESETS)
        m = torch.zeros(H, W, dtype=torch.bool)
        if preset == "left half":
            m[:, : W // 2] = True
        elif preset == "right half":
            m[:, W // 2:] = True
        elif preset == "top half":
            m[: H // 2] = True
        elif preset == "bottom half":
            m[H // 2:] = True
        elif preset == "centre square":
            m[H // 4: H - H // 4, W // 4: W - W // 4] = True
        else:
            layers = (editor or {}).get("layers") or []
            alpha = None
            for layer in layers:
                if layer is None:
                    continue
                a = np.asarray(layer.convert("RGBA") if isinstance(layer, Image.Image) else layer)
                if a.ndim != 3 or a.shape[2] < 4:
                    continue
                alpha = a[..., 3] if alpha is None else np.maximum(alpha, a[..., 3])
            if alpha is None or not alpha.any():
                raise gr.Error("Paint the region to regenerate on the image first (or pick a preset mask).")
            cover = Image.fromarray((alpha > 0).astype(np.uint8) * 255, "L").resize((W, H), Image.BOX)
            m = torch.from_numpy(np.asarray(cover) > 25)  # a model pixel >10% covered by strokes
            if not m.any():
                raise gr.Error("The painted strokes are too thin to cover a pixel at the model's size.")
        return m

    def inpaint(self, editor, which="digits", preset="painted", label=0, prompt="", num_images=4, seed=0,
                steps=5, guidance=0.0, progress=None):
        if not self.inpaint_available():
            raise gr.Error(NOT_AVAILABLE_INPAINT)
        from starflow.images import to_pil
        from starflow.inpaint import inpaint as inpaint_fn

        n = check_int(num_images, "Number of completions", 1, MAX_IMAGES)
        seed = check_int(seed, "Seed", 0, MAX_SEED)
        steps = check_int(steps, "Resampling rounds", 1, MAX_INPAINT_STEPS)
        w = check_float(guidance, "Guidance weight", 0.0, MAX_GUIDANCE)
        bg = (editor or {}).get("background")
        if bg is None:
            raise gr.Error("Upload an image or pick an example first.")
        pipe = self._slot(which).get()
        bg = bg if isinstance(bg, Image.Image) else Image.fromarray(np.asarray(bg))
        x8, _ = to_model_image(bg, pipe.image_shape)
        H, W = pipe.image_shape[1:]
        mask = self.mask_from(editor, (H, W), preset)
        y, prompt = self._condition(pipe, label, prompt)
        _progress(progress, 0.0, "inpainting")
        t0 = time.time()
        with self.lock:
            try:
                res = inpaint_fn(pipe, x8.expand(n, -1, -1, -1), mask, y=None if y is None else int(y[0]),
                                 prompt=prompt, steps=steps, guidance=w,
                                 generator=torch.Generator(pipe.device).manual_seed(seed))
            except ValueError as e:
                raise gr.Error(f"Inpainting failed: {e}") from None
        _progress(progress, 1.0, "done")
        images = _as_pil_list(res)
        shown = np.asarray(to_pil(x8[0]).convert("RGB")).copy()
        shown[mask.numpy()] = (255, 0, 255)
        gallery = [(upscale(Image.fromarray(shown)), "input; magenta = regenerated region")]
        gallery += [(upscale(im), f"completion {i}") for i, im in enumerate(images)]
        return gallery, (f"{len(images)} completions, {steps} resampling rounds, {mask.float().mean().item():.0%} of "
                         f"pixels regenerated, in {time.time() - t0:.2f} s.")


def _as_pil_list(out) -> list[Image.Image]:
    from starflow.images import to_pil

    if isinstance(out, Image.Image):
        return [out]
    if isinstance(out, torch.Tensor):
        return [to_pil(im) for im in (out if out.ndim == 4 else out[None])]
    if isinstance(out, (list, tuple)):
        res = []
        for o in out:
            res += _as_pil_list(o)
        return res
    if isinstance(out, dict) and "images" in out:
        return _as_pil_list(out["images"])
    if hasattr(out, "images"):  # a result object
        return _as_pil_list(out.images)
    raise gr.Error(f"inpainting returned {type(out).__name__}, not images")


# ---------------------------------------------------------------------------------------------------
# the Blocks
# ---------------------------------------------------------------------------------------------------
def _theme():
    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)  # plain strings: no web-font download


def build_app(demo: Demo, concurrency: int = DEFAULT_CONCURRENCY, queue_size: int = DEFAULT_QUEUE_SIZE) -> gr.Blocks:
    if concurrency < 1 or queue_size < 1:
        raise ValueError("concurrency and queue_size must be >= 1")
    rules = list(_guidance_rules())
    models = demo.model_choices()
    ev = dict(concurrency_id="model", concurrency_limit=concurrency)

    def sampling_controls(default_n: int):
        with gr.Row():
            n = gr.Slider(1, MAX_IMAGES, value=default_n, step=1, label=f"Number of images (max {MAX_IMAGES})")
            w = gr.Slider(0.0, MAX_GUIDANCE, value=1.0, step=0.25, label="Guidance weight w (0 = unguided)")
            rule = gr.Dropdown(rules, value="starflow", label="Guidance rule")
        with gr.Row():
            t = gr.Slider(MIN_TEMPERATURE, MAX_TEMPERATURE, value=1.0, step=0.05, label="Temperature")
            seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
            sampler = gr.Radio(list(SAMPLERS), value="sequential", label="Sampler")
        return n, w, rule, t, seed, sampler

    with gr.Blocks(title="starflow demo", analytics_enabled=False) as blocks:
        gr.Markdown("# starflow\nNormalizing-flow image generation (STARFlow / TARFlow), running locally.")
        with gr.Tab("Text to image", id="text"):
            if not demo.text.available:
                gr.Markdown(f"**Not available:** {demo.text.missing}")
            prompt = gr.Textbox(label=f"Prompt (max {MAX_PROMPT_CHARS} characters)", max_length=MAX_PROMPT_CHARS,
                                value="two red circles above a blue square", elem_id="prompt")
            controls = sampling_controls(4)
            go = gr.Button("Generate", variant="primary", elem_id="generate", interactive=demo.text.available)
            gallery = gr.Gallery(label="Images", columns=4, elem_id="gallery", format="png")
            info = gr.Markdown(elem_id="text-info")

            def run_text(p, n, w, rule, t, seed, sampler, progress=gr.Progress()):
                return demo.text_to_image(p, n, w, rule, t, seed, sampler, progress=progress)

            go.click(run_text, [prompt, *controls], [gallery, info], api_name="text_to_image", **ev)
            prompt.submit(run_text, [prompt, *controls], [gallery, info], api_name=False, **ev)

        with gr.Tab("Digits", id="digits"):
            if not demo.digits.available:
                gr.Markdown(f"**Not available:** {demo.digits.missing}")
            label = gr.Dropdown([str(i) for i in range(10)], value="3", label="Class (digit)")
            dcontrols = sampling_controls(16)
            dgo = gr.Button("Generate", variant="primary", elem_id="generate-digits", interactive=demo.digits.available)
            grid = gr.Image(label="Samples", type="pil", format="png", elem_id="digits-grid")
            dinfo = gr.Markdown()

            def run_digits(lab, n, w, rule, t, seed, sampler, progress=gr.Progress()):
                return demo.digits_grid(lab, n, w, rule, t, seed, sampler, progress=progress)

            dgo.click(run_digits, [label, *dcontrols], [grid, dinfo], api_name="digits", **ev)

        examples = list(demo.examples())
        max_mb = MAX_UPLOAD_BYTES // 2**20
        with gr.Tab("Inpainting", id="inpaint"):
            if not demo.inpaint_available():
                gr.Markdown(f"**Not available:** {NOT_AVAILABLE_INPAINT}", elem_id="inpaint-missing")
            with gr.Row():
                i_upload = gr.File(label=f"Upload an image (max {max_mb} MB)", file_types=["image"], type="filepath")
                i_example = gr.Dropdown(examples, value=None, label="... or pick an example")
                i_model = gr.Radio(models, value=models[0] if models else None, label="Model")
            editor = gr.ImageEditor(label="Paint the region to regenerate", elem_id="inpaint-editor", type="pil", sources=(),
                                    brush=gr.Brush(colors=["#ff00ff"], default_size=24), layers=False,
                                    transforms=(), canvas_size=(EDITOR_SIDE, EDITOR_SIDE))
            i_note = gr.Markdown()
            with gr.Row():
                preset = gr.Radio(list(MASK_PRESETS), value="painted", label="Mask")
                i_label = gr.Dropdown([str(i) for i in range(10)], value="3", label="Class (class models)")
                i_prompt = gr.Textbox(label="Prompt (text models)", max_length=MAX_PROMPT_CHARS)
            with gr.Row():
                i_n = gr.Slider(1, MAX_IMAGES, value=4, step=1, label="Completions")
                i_seed = gr.Number(value=0, precision=0, minimum=0, maximum=MAX_SEED, label="Seed")
                i_steps = gr.Slider(1, MAX_INPAINT_STEPS, value=5, step=1, label="Resampling rounds")
                i_w = gr.Slider(0.0, MAX_GUIDANCE, value=0.0, step=0.25, label="Guidance weight w")
            igo = gr.Button("Inpaint", variant="primary", interactive=demo.inpaint_available())
            i_gallery = gr.Gallery(label="Completions", columns=5, format="png", elem_id="inpaint-gallery")
            i_info = gr.Markdown(elem_id="inpaint-info")

            i_upload.upload(demo.editor_value, [i_upload, i_model], [editor, i_note], api_name=False)
            i_example.change(lambda name, which: demo.editor_value(demo.example(name), which) if name else (gr.skip(), gr.skip()),
                             [i_example, i_model], [editor, i_note], api_name=False)

            def run_inpaint(ed, which, pre, lab, p, n, seed, steps, w, progress=gr.Progress()):
                return demo.inpaint(ed, which, pre, lab, p, n, seed, steps, w, progress=progress)

            igo.click(run_inpaint, [editor, i_model, preset, i_label, i_prompt, i_n, i_seed, i_steps, i_w],
                      [i_gallery, i_info],
                      api_name="inpaint", **ev)

        with gr.Tab("Encode → decode", id="encode"):
            gr.Markdown("A flow is invertible: an image maps to exactly one noise tensor z = f(x), and f⁻¹(z) "
                        "gives the image back. This tab shows z, the round trip and the image's bits/dim.")
            with gr.Row():
                e_upload = gr.File(label=f"Upload an image (max {max_mb} MB)", file_types=["image"], type="filepath")
                e_example = gr.Dropdown(examples, value=None, label="... or pick an example")
                e_model = gr.Radio(models, value=models[0] if models else None, label="Model")
            with gr.Row():
                e_label = gr.Dropdown([str(i) for i in range(10)], value="0", label="Class (class models)")
                e_prompt = gr.Textbox(label="Prompt (text models)", max_length=MAX_PROMPT_CHARS)
            ego = gr.Button("Encode and decode", variant="primary", elem_id="encode-go")
            with gr.Row():
                e_in = gr.Image(label="Input (model size)", type="pil", format="png", interactive=False)
                e_z = gr.Image(label="Noise z = f(x)", type="pil", format="png", interactive=False)
                e_out = gr.Image(label="Round trip f⁻¹(f(x))", type="pil", format="png", interactive=False)
            e_info = gr.Markdown(elem_id="encode-info")

            def run_encode(up, ex, which, lab, p, progress=gr.Progress()):
                src = up if up else demo.example(ex)
                return demo.encode_decode(src, which, lab, p, progress=progress)

            ego.click(run_encode, [e_upload, e_example, e_model, e_label, e_prompt], [e_in, e_z, e_out, e_info],
                      api_name="encode_decode", **ev)
        gr.Markdown(f"Limits: {MAX_IMAGES} images per request, {MAX_PROMPT_CHARS}-character prompts, "
                    f"{max_mb} MB uploads. Requests are queued and run {concurrency} at a time.")
    blocks.queue(max_size=queue_size, default_concurrency_limit=concurrency)
    return blocks


def launch(blocks: gr.Blocks, host: str = "127.0.0.1", port: int = 7860, block: bool = True, quiet: bool = False):
    """Start the server (never shared publicly). ``block=False`` returns once it is up."""
    return blocks.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block,
                         max_file_size=MAX_UPLOAD_BYTES, show_error=True, quiet=quiet, theme=_theme(),
                         ssr_mode=False, footer_links=["api"], inbrowser=False)
