"""A generator a user calls, diffusers-style: flow model + (optional) autoencoder + (optional) text encoder.

    pipe = StarflowPipeline.from_pretrained(directory)
    images = pipe("two red circles above a blue square", num_images=4, guidance_scale=3.0, generator=g)

A pipeline directory holds ``model_index.json`` and one sub-folder per saved component:

    model_index.json   {"model": "model", "autoencoder": "autoencoder", "text_encoder": {...},
                        "noise_std": 0.3, "denoise": "decoder"}
    model/             config.json + model.safetensors (STARFlow, rectified flow or FlowAR)
    autoencoder/       a diffusers AutoencoderKL folder (latent models only)

A bare model directory (config.json + model.safetensors, a pixel-space model) loads as a pipeline too.

``noise_std`` is the Gaussian noise the flow was trained with (in its own space: latents or [-1,1]
pixels). A sample is then a *noisy* datum; ``denoise`` says how it is cleaned: ``decoder`` (a decoder
fine-tuned on noisy latents does it), ``tweedie`` (one score step through the flow's exact density,
x + sigma^2 grad log p(x)) or ``none``.
"""
from __future__ import annotations

import json
import os

import torch

from starflow.errors import ConfigError
from starflow.io.hub import atomic_write_bytes, inside, read_config

INDEX = "model_index.json"
DENOISE = ("decoder", "tweedie", "none")


def _model_class(model_type: str):
    from starflow.models import model_class

    return model_class(model_type)


class StarflowPipeline:
    def __init__(self, model, autoencoder=None, text_encoder=None, noise_std: float = 0.0, denoise: str | None = None):
        denoise = denoise or ("decoder" if autoencoder is not None else "tweedie")
        if denoise not in DENOISE:
            raise ValueError(f"unknown denoise {denoise!r}; expected one of {DENOISE}")
        self.model = model.eval()
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.text_encoder = text_encoder
        self.noise_std = noise_std
        self.denoise = denoise

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
    def encode_prompts(self, prompts: list[str]):
        """Prompts -> the model's text argument: (states, mask) for STARFlow, + pooled for the peers."""
        if self.text_encoder is None:
            raise ValueError("this model is not text-conditional; use class labels (or nothing)")
        emb = self.text_encoder.encode(list(prompts))
        dev = self.device
        if getattr(self.model, "model_type", "") == "starflow":
            return (emb.states.to(dev), emb.mask.to(dev))
        return (emb.states.to(dev), emb.mask.to(dev), emb.pooled.to(dev))

    # ---- sampling ---------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, y=None, prompt: str | list[str] | None = None, generator=None, device=None, **kwargs) -> torch.Tensor:
        """n images as a float tensor in [-1, 1], [n, C, H, W]. ``kwargs`` go to the model's sampler."""
        text = None
        if prompt is not None:
            prompts = [prompt] * n if isinstance(prompt, str) else list(prompt)
            if len(prompts) != n:
                raise ValueError(f"got {len(prompts)} prompts for {n} images")
            text = self.encode_prompts(prompts)
        device = device or self.device
        x = self.model.sample(n, y=y, text=text, generator=generator, device=device, **kwargs)
        return self.finish(x, y=y, text=text)

    def finish(self, x: torch.Tensor, y=None, text=None) -> torch.Tensor:
        """A raw model sample -> images in [-1, 1]: denoise if the model was trained on noisy data, decode."""
        if self.denoise == "tweedie" and self.noise_std > 0 and hasattr(self.model, "log_prob"):
            from starflow.components.denoise import tweedie_denoise

            x = tweedie_denoise(lambda v: self.model.log_prob(v, y, text), x, self.noise_std)
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        return x.clamp(-1, 1)

    def __call__(self, prompt: str | list[str] | None = None, class_label: int | None = None, num_images: int = 1,
                 guidance_scale: float = 0.0, generator: torch.Generator | None = None, **kwargs):
        """Generate PIL images. ``guidance_scale`` is the guidance weight w (0 = unguided)."""
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
        if not hasattr(self.model, "log_prob"):
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
        if self.autoencoder is not None:
            self.autoencoder.save_pretrained(os.path.join(directory, "autoencoder"))
            index["autoencoder"] = "autoencoder"
        if self.text_encoder is not None:
            index["text_encoder"] = self.text_encoder.to_spec()
        atomic_write_bytes(os.path.join(directory, INDEX), json.dumps(index, indent=2).encode())

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu", denoise: str | None = None) -> "StarflowPipeline":
        index_path = os.path.join(directory, INDEX)
        if not os.path.exists(index_path):  # a bare model directory
            cfg = read_config(directory)
            model = _model_class(cfg.get("model_type", "starflow")).from_pretrained(directory, map_location=device)
            return cls(model)
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"corrupt pipeline index {index_path}: {e}") from None
        if not isinstance(index, dict) or "model" not in index:
            raise ConfigError(f"pipeline index {index_path} must be a JSON object with a 'model' entry")
        model_dir = inside(directory, index["model"], f"{index_path}: model")
        model = _model_class(read_config(model_dir).get("model_type", "starflow")).from_pretrained(model_dir, map_location=device)
        autoencoder = text_encoder = None
        if index.get("autoencoder"):
            from starflow.components.autoencoder import Autoencoder

            autoencoder = Autoencoder.from_pretrained(inside(directory, index["autoencoder"], f"{index_path}: autoencoder"),
                                                      device=device)
        if index.get("text_encoder"):
            from starflow.components.text_encoder import TextEncoder

            text_encoder = TextEncoder.from_spec(index["text_encoder"]).to(device)
        return cls(model, autoencoder, text_encoder, index.get("noise_std", 0.0), denoise or index.get("denoise"))


def load_pretrained(directory: str, map_location="cpu") -> StarflowPipeline:
    """A ``StarflowPipeline`` for a pipeline or bare model directory: ``.sample(n, y=..., prompt=...)``
    returns images in [-1, 1] whatever space the model lives in."""
    return StarflowPipeline.from_pretrained(directory, device=map_location)
