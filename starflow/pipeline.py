"""A generator a user calls, diffusers-style: flow model + (optional) autoencoder + (optional) text encoder.

    pipe = StarflowPipeline.from_pretrained(directory)
    images = pipe("two red circles above a blue square", num_images=4, guidance_scale=3.0, generator=g)

A pipeline directory holds ``model_index.json`` and one sub-folder per saved component:

    model_index.json   {"model": "model", "autoencoder": "autoencoder", "text_encoder": {...},
                        "noise_std": 0.3, "denoise": "decoder"}
    model/             config.json + model.safetensors (STARFlow, rectified flow or FlowAR)
    autoencoder/       a diffusers AutoencoderKL folder (latent models only)

A bare model directory (config.json + model.safetensors, a pixel-space model) loads as a pipeline too.

``sampling`` (optional) holds the sampling settings measured best for this model (``guidance``,
``temperature``, ``sampler``, ``guidance_rule``); the CLI and the demo use them when the user does not
choose. ``sample``/``__call__`` keep their own explicit defaults, so library calls do not change.

A shipped model is also reachable by name from any folder: ``from_pretrained("shapes")`` or
``from_pretrained("starflow:shapes")`` (see ``starflow.io.shipped``).

``noise_std`` is the Gaussian noise the flow was trained with (in its own space: latents or [-1,1]
pixels). A sample is then a *noisy* datum; ``denoise`` says how it is cleaned: ``decoder`` (a decoder
fine-tuned on noisy latents does it), ``tweedie`` (one score step through the flow's exact density,
x + sigma^2 grad log p(x)) or ``none``.
"""
from __future__ import annotations

import json
import os
import warnings

import torch

from starflow.components.postprocess import DENOISE, denoise_and_decode
from starflow.errors import ConfigError
from starflow.flow.condition import Condition
from starflow.flow.guidance import guidance_weight
from starflow.flow.samplers import EulerSampler
from starflow.io.hub import atomic_write_bytes, inside, read_config
from starflow.protocols import LikelihoodModel

INDEX = "model_index.json"
# A flow's inverse can overflow float range on a draw from the far tail of the prior (most of all a flow
# trained without noise augmentation); such images are drawn again, this many times at most.
MAX_REDRAWS = 3
# What sampling does when neither the model's index nor the user says otherwise.
SAMPLING_DEFAULTS = {"guidance": 0.0, "temperature": 1.0, "sampler": "sequential", "guidance_rule": "starflow"}


def check_sampling(sampling: dict | None) -> dict:
    """Validate a model_index.json ``sampling`` entry; returns a copy."""
    sampling = dict(sampling or {})
    unknown = sorted(set(sampling) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown sampling setting(s) {unknown}; expected some of {sorted(SAMPLING_DEFAULTS)}")
    for key in ("guidance", "temperature"):
        if key in sampling and not (isinstance(sampling[key], (int, float)) and sampling[key] >= 0):
            raise ValueError(f"sampling.{key} must be a number >= 0, got {sampling[key]!r}")
    return sampling


def _model_class(model_type: str):
    from starflow.models import model_class  # lazy: components (diffusers, transformers) only when the folder has them

    return model_class(model_type)


def _load_model(directory: str, device, dtype: torch.dtype | None):
    model_type = read_config(directory).get("model_type", "starflow")
    if dtype is None:
        return _model_class(model_type).from_pretrained(directory, map_location=device)
    if model_type != "starflow":
        raise ValueError(f"a weight dtype can be chosen for STARFlow models, not {model_type!r}")
    return _model_class(model_type).from_pretrained(directory, map_location=device, dtype=dtype)


def read_sampling(directory: str) -> dict:
    """A saved pipeline's sampling defaults (library defaults filled in) without loading the model."""
    # lazy: components (diffusers, transformers) only when the folder has them
    from starflow.io.shipped import resolve_model

    path = os.path.join(resolve_model(directory), INDEX)
    sampling = {}
    if os.path.exists(path):
        with open(path) as f:
            sampling = check_sampling(json.load(f).get("sampling"))
    return {**SAMPLING_DEFAULTS, **sampling}


class StarflowPipeline:
    def __init__(self, model, autoencoder=None, text_encoder=None, noise_std: float = 0.0, denoise: str | None = None,
                 sampling: dict | None = None, sampler=None):
        denoise = denoise or ("decoder" if autoencoder is not None else "tweedie")
        if denoise not in DENOISE:
            raise ValueError(f"unknown denoise {denoise!r}; expected one of {DENOISE}")
        self.model = model.eval()
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.text_encoder = text_encoder
        self.noise_std = noise_std
        self.denoise = denoise
        self.sampling = check_sampling(sampling)
        # The sampler component (a FlowSampler for STARFlow, an EulerSampler for the peers), used when a
        # call names none; None: the model's own default. A call's sampler= (object or name) wins.
        self.sampler = sampler

    @property
    def sampling_defaults(self) -> dict:
        """The settings to sample with when the user chooses none: the model's own, else the library's."""
        return {**SAMPLING_DEFAULTS, **self.sampling}

    # ---- properties users and tools read -------------------------------------------------------
    @property
    def config(self):
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_classes(self) -> int:
        return getattr(self.model.config, "num_classes", 0)

    @property
    def is_text_conditional(self) -> bool:
        return bool(getattr(self.model.config, "cond_dim", 0))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.model.config
        if self.autoencoder is None:
            return (c.in_channels, c.image_size, c.image_size)
        side = c.image_size * self.autoencoder.downsample
        return (self.autoencoder.image_channels, side, side)

    def to(self, device):
        self.model.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)
        return self

    # ---- conditions -----------------------------------------------------------------------------
    def prompt_condition(self, prompts: list[str], allow_empty: bool = False, y=None) -> Condition:
        """Prompts (and class labels ``y``) -> the one ``Condition`` every model family reads: text states,
        mask and pooled vector (a flow ignores the pooled vector). ``allow_empty``: the empty prompt is
        allowed (a negative condition, as the released model uses)."""
        return Condition.from_args(y, self.encode_prompts(prompts, allow_empty))

    def encode_prompts(self, prompts: list[str], allow_empty: bool = False):
        """Prompts -> the text tuple (states, mask, pooled) that every family's ``text=`` argument takes.
        ``allow_empty``: the empty prompt is allowed (a negative condition, as the released model uses)."""
        if self.text_encoder is None:
            raise ValueError("this model is not text-conditional; use class labels (or nothing)")
        emb = self.text_encoder.encode(list(prompts), allow_empty=True) if allow_empty else self.text_encoder.encode(list(prompts))
        dev = self.device
        return (emb.states.to(dev), emb.mask.to(dev), emb.pooled.to(dev))

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y=None, prompt: str | list[str] | None = None, generator=None, device=None,
               negative_prompt: str | None = None, **kwargs) -> torch.Tensor:
        """n images as a float tensor in [-1, 1], [n, C, H, W]. ``kwargs`` go to the model's sampler.

        Guidance's unconditional branch reads the model's learned null, or the encoded ``negative_prompt``
        when given; a model without a learned null (the released STARFlow) uses the empty prompt by default."""
        cond = Condition.from_args(y)
        if prompt is not None:
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            if len(prompts) != n:
                raise ValueError(f"got {len(prompts)} prompts for {n} images")
            cond = self.prompt_condition(prompts, y=y)
            no_null = not getattr(self.model.config, "learned_null", True)
            if guidance_weight(kwargs.get("guidance", 0)) > 0 and (negative_prompt is not None or no_null):
                kwargs["negative"] = self.prompt_condition([negative_prompt or ""] * n, allow_empty=True)
        elif negative_prompt is not None:
            raise ValueError("negative_prompt needs a prompt")
        device = device or self.device
        if self.sampler is not None and "sampler" not in kwargs:  # the component, with this call's own choices
            kwargs["sampler"] = self.sampler.overridden_by(kwargs) if isinstance(self.sampler, EulerSampler) \
                else self.sampler
        x = self.model.sample(n, generator=generator, device=device, cond=cond, **kwargs)
        for _ in range(MAX_REDRAWS):
            bad = ~torch.isfinite(x.flatten(1)).all(1)
            if not bad.any():
                break
            warnings.warn(f"{int(bad.sum())} of {n} draws overflowed float range in the model's sampler; drawing "
                          "them again (each image keeps its own condition)")
            x[bad] = self.model.sample(n, generator=generator, device=device, cond=cond, **kwargs)[bad]
        return self.finish(x, cond=cond)

    def finish(self, x: torch.Tensor, y=None, text=None, cond: Condition | None = None) -> torch.Tensor:
        """A raw model sample -> images in [-1, 1]: denoise if the model was trained on noisy data, decode."""
        cond = cond if cond is not None else Condition.from_args(y, text)
        log_prob = (lambda v: self.model.log_prob(v, cond=cond)) if isinstance(self.model, LikelihoodModel) else None
        return denoise_and_decode(x, self.denoise, self.noise_std, log_prob, self.autoencoder)

    def __call__(self, prompt: str | list[str] | None = None, class_label: int | None = None, num_images: int = 1,
                 guidance_scale: float = 0.0, generator: torch.Generator | None = None, **kwargs):
        """Generate PIL images. ``guidance_scale`` is the guidance weight w (0 = unguided), or for a flow a
        ``starflow.flow.guidance.Guidance`` (weight and rule)."""
        # lazy: components (diffusers, transformers) only when the folder has them
        from starflow.io.images import to_pil

        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        y = None
        if class_label is not None:
            y = torch.full((num_images,), int(class_label), dtype=torch.long)
        if guidance_scale:
            kwargs["guidance"] = guidance_scale
        images = self.sample(num_images, y=y, prompt=prompt, generator=generator, **kwargs)
        return [to_pil(im) for im in images]

    # ---- likelihood (flows only) ---------------------------------------------------------------
    def _flow(self):
        if not isinstance(self.model, LikelihoodModel):
            raise NotImplementedError(f"{type(self.model).__name__} has no exact likelihood")
        return self.model

    def nll(self, x: torch.Tensor, y=None, text=None) -> torch.Tensor:
        """nats/dim of x in the model's space (pixels in [-1,1], or normalised latents)."""
        return self._flow().nll(x, y, text)

    def bits_per_dim(self, images: torch.Tensor, y=None, generator=None) -> torch.Tensor:
        if self.autoencoder is not None:
            raise NotImplementedError("bits/dim is defined for pixel-space models; a latent model reports "
                                      "nats/dim of latents (use nll on encoded images)")
        return self._flow().bits_per_dim(images, y, generator=generator)

    # ---- persistence ---------------------------------------------------------------------------------
    def save_pretrained(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self.model.save_pretrained(os.path.join(directory, "model"))
        index = {"model": "model", "noise_std": self.noise_std, "denoise": self.denoise}
        if self.sampling:
            index["sampling"] = self.sampling
        if self.autoencoder is not None:
            self.autoencoder.save_pretrained(os.path.join(directory, "autoencoder"))
            index["autoencoder"] = "autoencoder"
        if self.text_encoder is not None:
            index["text_encoder"] = self.text_encoder.to_spec()
        atomic_write_bytes(os.path.join(directory, INDEX), json.dumps(index, indent=2).encode())

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu", denoise: str | None = None,
                        dtype: torch.dtype | None = None, decoder: str | None = None) -> "StarflowPipeline":
        """``directory``: a pipeline or bare model directory, or a shipped model's name (``shapes``,
        ``starflow:mnist``, ...). ``dtype`` (STARFlow models): the flow's weight dtype, e.g.
        ``torch.bfloat16`` to run a large imported model in half the memory; default float32.
        ``decoder``: another autoencoder of the same latent space (shipped name or folder) to use in place
        of the saved one, e.g. a clean decoder with ``denoise="tweedie"``."""
        # lazy: components (diffusers, transformers) only when the folder has them
        from starflow.io.shipped import resolve_model

        directory = resolve_model(directory)
        index_path = os.path.join(directory, INDEX)
        if not os.path.exists(index_path):  # a bare model directory
            return cls(_load_model(directory, device, dtype))
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"corrupt pipeline index {index_path}: {e}") from None
        if not isinstance(index, dict) or "model" not in index:
            raise ConfigError(f"pipeline index {index_path} must be a JSON object with a 'model' entry")
        model = _load_model(inside(directory, index["model"], f"{index_path}: model"), device, dtype)
        autoencoder = text_encoder = None
        if index.get("autoencoder"):
            # lazy: components (diffusers, transformers) only when the folder has them
            from starflow.components.autoencoder import Autoencoder

            autoencoder = Autoencoder.from_pretrained(inside(directory, index["autoencoder"], f"{index_path}: autoencoder"),
                                                      device=device)
        if index.get("text_encoder"):
            # lazy: components (diffusers, transformers) only when the folder has them
            from starflow.components.text_encoder import TextEncoder

            text_encoder = TextEncoder.from_spec(index["text_encoder"]).to(device)
        if decoder is not None:
            autoencoder = _swap_autoencoder(autoencoder, decoder, device, directory)
        return cls(model, autoencoder, text_encoder, index.get("noise_std", 0.0), denoise or index.get("denoise"),
                   sampling=index.get("sampling"))


def _swap_autoencoder(saved, spec: str, device, directory: str):
    """The autoencoder ``spec`` in place of a pipeline's ``saved`` one, refused unless both read and write
    the same latent space (a decoder of another space would turn every sample into noise)."""
    from starflow.components.autoencoder import resolve_autoencoder  # lazy: diffusers

    if saved is None:
        raise ConfigError(f"--decoder {spec}: the model in {directory} is not a latent model (it has no autoencoder)")
    new = resolve_autoencoder(spec, device=device)
    if new.latent_space_fingerprint() != saved.latent_space_fingerprint():
        raise ConfigError(f"--decoder {spec}: its latent space is not the one the model in {directory} was trained "
                          "in (different encoder fingerprint); use an autoencoder fine-tuned from or aligned to it")
    return new


def load_pretrained(directory: str, map_location="cpu", denoise: str | None = None,
                    decoder: str | None = None) -> StarflowPipeline:
    """A ``StarflowPipeline`` for a pipeline or bare model directory (or shipped name): ``.sample(n, y=..., prompt=...)``
    returns images in [-1, 1] whatever space the model lives in."""
    return StarflowPipeline.from_pretrained(directory, device=map_location, denoise=denoise, decoder=decoder)
