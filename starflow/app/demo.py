"""The models behind the tabs: each tab handler validates its inputs, runs the pipeline and returns images."""
from __future__ import annotations

import os
import threading
import time

import numpy as np
import torch
from PIL import Image

from starflow.app.inputs import (
    CHUNK, DISPLAY_SIDE, EDITOR_SIDE, MASK_PRESETS, MAX_GUIDANCE, MAX_IMAGES, MAX_INPAINT_STEPS,
    MAX_SEED, MAX_TEMPERATURE, MIN_TEMPERATURE, NOT_AVAILABLE_INPAINT, SAMPLERS, _guidance_rules,
    _progress, check_choice, check_float, check_pixels, check_int, check_prompt, load_upload, noise_to_image,
    to_model_image, upscale,
)
from starflow.protocols import LikelihoodModel
import gradio as gr  # noqa: E402  (imported after starflow.app.inputs set the offline environment)

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

    def sampling_defaults(self) -> dict:
        """The model's own sampling settings (model_index.json), read without loading it."""
        # lazy: the demo imports models and image code on first use
        from starflow.pipeline import SAMPLING_DEFAULTS, read_sampling

        if self._pipe is not None:
            return dict(getattr(self._pipe, "sampling_defaults", SAMPLING_DEFAULTS))
        if self.missing:
            return dict(SAMPLING_DEFAULTS)
        return read_sampling(str(self.source))

    def get(self):
        if self.missing:
            raise gr.Error(self.missing)
        with self._load_lock:
            if self._pipe is None:
                # lazy: the demo imports models and image code on first use
                from starflow.pipeline import StarflowPipeline

                self._pipe = StarflowPipeline.from_pretrained(str(self.source), device=self.device)
        return self._pipe


def _check_sampling(num_images, guidance, rule, temperature, seed, sampler) -> tuple:
    """The sampling controls shared by the text and digits tabs, validated in the order the user sees them."""
    return (check_int(num_images, "Number of images", 1, MAX_IMAGES),
            check_float(guidance, "Guidance weight", 0.0, MAX_GUIDANCE),
            check_choice(rule, "Guidance rule", _guidance_rules()),
            check_float(temperature, "Temperature", MIN_TEMPERATURE, MAX_TEMPERATURE),
            check_int(seed, "Seed", 0, MAX_SEED),
            check_choice(sampler, "Sampler", SAMPLERS))


def _fill(slot: Slot, guidance, rule, temperature, sampler) -> tuple:
    """Replace the settings a caller left None by the slot's model defaults."""
    d = slot.sampling_defaults()
    given = {"guidance": guidance, "guidance_rule": rule, "temperature": temperature, "sampler": sampler}
    return tuple(d[k] if v is None else v for k, v in given.items())


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
        from starflow.pipeline import StarflowPipeline  # lazy: the demo imports models and image code on first use

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
    def text_to_image(self, prompt, num_images=4, guidance=None, rule=None, temperature=None, seed=0,
                      sampler=None, progress=None):
        """Settings left None take the model's own (``Slot.sampling_defaults``)."""
        prompt = check_prompt(prompt)
        guidance, rule, temperature, sampler = _fill(self.text, guidance, rule, temperature, sampler)
        n, w, rule, t, seed, sampler = _check_sampling(num_images, guidance, rule, temperature, seed, sampler)
        pipe = self.text.get()
        if not pipe.is_text_conditional:
            raise gr.Error("The loaded model is not text-conditional.")
        images, dt = self._sample(pipe, n, seed, progress, prompt=prompt, guidance=w,
                                  **_sampler_kwargs(pipe, t, rule, sampler))
        return [(upscale(im), f"{prompt} · seed {seed} · #{i}") for i, im in enumerate(images)], \
            f"{n} images in {dt:.2f} s ({sampler}, w={w:g}, {rule} rule, T={t:g}); shown upscaled (nearest)."

    # ---- Digits ------------------------------------------------------------------------------------------
    def digits_grid(self, label, num_images=16, guidance=None, rule=None, temperature=None, seed=0,
                    sampler=None, progress=None):
        """Settings left None take the model's own (``Slot.sampling_defaults``)."""
        from starflow.io.images import make_grid  # lazy: the demo imports models and image code on first use

        guidance, rule, temperature, sampler = _fill(self.digits, guidance, rule, temperature, sampler)

        n, w, rule, t, seed, sampler = _check_sampling(num_images, guidance, rule, temperature, seed, sampler)
        pipe = self.digits.get()
        label = check_int(label, "Class", 0, max(pipe.num_classes - 1, 0))
        y = torch.full((n,), label, dtype=torch.long) if pipe.num_classes else None
        images, dt = self._sample(pipe, n, seed, progress, y=y, guidance=w, as_tensor=True,
                                  **_sampler_kwargs(pipe, t, rule, sampler))
        what = f"class {label}" if pipe.num_classes else "unconditional"
        return upscale(make_grid(images, nrow=min(n, 4)), 4 * DISPLAY_SIDE), \
            f"{n} samples ({what}) in {dt:.2f} s ({sampler}, w={w:g}, {rule} rule, T={t:g})."

    def _sample(self, pipe, n, seed, progress, y=None, prompt=None, guidance=0.0, as_tensor=False, **kw):
        from starflow.io.images import to_pil  # lazy: the demo imports models and image code on first use

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
        """-> (input as the model sees it, noise image, round trip, markdown report). Uses starflow.tasks.encode."""
        from starflow.tasks import encode as E  # lazy: the demo imports models and image code on first use
        from starflow.io.images import to_pil  # lazy: the demo imports models and image code on first use

        slot = self._slot(which)
        img = load_upload(upload)
        pipe = slot.get()
        if not isinstance(pipe.model, LikelihoodModel):
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
            return importlib.util.find_spec("starflow.tasks.inpaint") is not None
        except (ImportError, ValueError):
            return False

    def examples(self) -> dict[str, Image.Image]:
        """A few example images per available model: real test-split images of its dataset."""
        if self._examples is None:
            ex = {}
            if self.digits.available:
                try:
                    # lazy: the demo imports models and image code on first use
                    from starflow.data.digits import load_mnist_subset

                    imgs, labels = load_mnist_subset("test")
                    for k in range(3):
                        i = int(np.flatnonzero(labels == k * 3)[0])
                        ex[f"MNIST test digit ({int(labels[i])})"] = Image.fromarray(np.asarray(imgs[i], np.uint8).reshape(28, 28), "L")
                except Exception:  # the example set is a convenience; uploads still work
                    pass
            if self.text.available:
                try:
                    # lazy: the demo imports models and image code on first use
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
        from starflow.io.images import to_pil  # lazy: the demo imports models and image code on first use

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
        from starflow.io.images import to_pil  # lazy: the demo imports models and image code on first use
        # lazy: the demo imports models and image code on first use
        from starflow.tasks.inpaint import inpaint as inpaint_fn

        n = check_int(num_images, "Number of completions", 1, MAX_IMAGES)
        seed = check_int(seed, "Seed", 0, MAX_SEED)
        steps = check_int(steps, "Resampling rounds", 1, MAX_INPAINT_STEPS)
        w = check_float(guidance, "Guidance weight", 0.0, MAX_GUIDANCE)
        bg = (editor or {}).get("background")
        if bg is None:
            raise gr.Error("Upload an image or pick an example first.")
        pipe = self._slot(which).get()
        if isinstance(bg, (str, dict, os.PathLike)):  # a file (API callers): the upload checks apply
            bg = load_upload(bg)
        check_pixels(bg)  # the editor's background skips load_upload: the same limit, before any work
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
    from starflow.io.images import to_pil  # lazy: the demo imports models and image code on first use

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
