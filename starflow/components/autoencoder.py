"""Image autoencoders for latent STARFlow: a thin wrapper around diffusers' ``AutoencoderKL`` (and
``AutoencoderTiny``) that adds latent normalisation and clear loading errors.

Conventions
-----------
* Images are float tensors in [-1, 1], shape [B, C, H, W] (``images_to_float`` converts uint8).
* ``encode`` returns *normalised* latents ``(z_raw - shift) * scale`` so that the latents of the
  training data have roughly zero mean and unit variance (the flow and its noise level σ = 0.3 assume
  this). ``decode`` undoes the normalisation before running the decoder.
* ``shift``/``scale`` come from the diffusers config (``shift_factor``/``scaling_factor``; SD-VAE:
  0 / 0.18215), or, when present, from a sidecar ``starflow_autoencoder.json`` in the same directory,
  which wins. If the config has per-channel ``latents_mean``/``latents_std`` (SDXL-style) they are
  used as ``shift = mean``, ``scale = scaling_factor / std``.

A directory written by ``save_pretrained`` is a plain diffusers model directory (``config.json`` +
``diffusion_pytorch_model.safetensors``) plus the sidecar, so ``AutoencoderKL.from_pretrained`` reads
it too; conversely any diffusers AutoencoderKL directory (e.g. an SD-VAE, or a pipeline folder with a
``vae/`` sub-folder) loads here with ``Autoencoder.from_pretrained(path)`` (``--vae PATH``).

Weights are only ever read from safetensors (never unpickled) and never fetched from the network.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import torch
from torch import nn

from starflow.components import autoencoder_kl
from starflow.components.autoencoder_files import (  # noqa: F401  (constants kept importable here)
    DIFFUSERS_CONFIG,
    DIFFUSERS_WEIGHTS,
    ENCODER_PREFIXES,
    SIDECAR_NAME,
    SUPPORTED_CLASSES,
    check_channels,
    read_json,
    resolve_vae_dir,
    stored_dtype,
)
from starflow.data.spaces import linear_to_uint8, uint8_to_linear
from starflow.io.hub import atomic_save_safetensors, atomic_write_bytes, check_finite

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
# name -> sub-folder of starflow/assets
DEFAULT_AUTOENCODERS = {
    "mnist": "autoencoder_mnist",
    # same encoder and latent normalisation as "mnist"; decoder fine-tuned on z + 0.3·ε -> x
    "mnist_ft": "autoencoder_mnist_ft",
    "shapes": "autoencoder_shapes",
    "shapes_ft": "autoencoder_shapes_ft",
    # 64x64 scenes -> the same 4x8x8 latent space as "shapes" (8x; encoder aligned to it, see its RECIPE.md)
    "shapes64": "autoencoder_shapes64",
    "shapes64_ft": "autoencoder_shapes64_ft",
}


def images_to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]; floating input is returned unchanged (assumed in [-1, 1])."""
    if images.dtype == torch.uint8:
        return uint8_to_linear(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    return images


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float [-1, 1] -> uint8 [0, 255] (clamped, rounded)."""
    return linear_to_uint8(images)


def _as_channel_vector(value, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(value if value is not None else 0.0, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(channels).clone()
    if t.numel() != channels:
        raise ValueError(f"{name} has {t.numel()} values but the autoencoder has {channels} latent channels")
    return t


def _scalar_or_list(t: torch.Tensor):
    t = t.detach().cpu().float()
    if bool((t == t[0]).all()):
        return float(t[0])
    return [float(v) for v in t]


class Autoencoder(nn.Module):
    """Wraps a diffusers ``AutoencoderKL`` or ``AutoencoderTiny`` with latent normalisation.

    Args:
        vae: the diffusers model.
        scaling_factor / shift_factor: latent normalisation, float or per-channel sequence; ``None``
            takes them from ``vae.config``.
        decoder_noise_sigma: if the decoder was fine-tuned to read noisy latents ``z + σε`` (normalised
            units), that σ; ``None`` for an ordinary decoder. Informational (saved and reloaded).
        info: free-form metadata saved in the sidecar (dataset, recipe, metrics, ...).
    """

    def __init__(self, vae: nn.Module, scaling_factor=None, shift_factor=None,
                 decoder_noise_sigma: float | None = None, info: dict | None = None):
        super().__init__()
        cls = type(vae).__name__
        if cls not in SUPPORTED_CLASSES:
            raise TypeError(f"expected a diffusers AutoencoderKL or AutoencoderTiny, got {cls}")
        self.vae = vae
        cfg = vae.config
        c = self.latent_channels
        if scaling_factor is None and shift_factor is None and cls == "AutoencoderKL" \
                and cfg.get("latents_mean") is not None and cfg.get("latents_std") is not None:
            std = _as_channel_vector(cfg["latents_std"], c, "latents_std")
            shift = _as_channel_vector(cfg["latents_mean"], c, "latents_mean")
            scale = float(cfg.get("scaling_factor", 1.0)) / std
        else:
            if scaling_factor is None:
                scaling_factor = cfg.get("scaling_factor", 1.0)
            if shift_factor is None:
                shift_factor = cfg.get("shift_factor", None)
            scale = _as_channel_vector(scaling_factor, c, "scaling_factor")
            shift = _as_channel_vector(shift_factor, c, "shift_factor")
        if not torch.isfinite(scale).all() or bool((scale == 0).any()):
            raise ValueError(f"invalid latent scaling factor {scale.tolist()}")
        self.register_buffer("latent_scale", scale, persistent=False)
        self.register_buffer("latent_shift", shift, persistent=False)
        self.decoder_noise_sigma = decoder_noise_sigma
        self.info = dict(info or {})
        self.source_dir: str | None = None
        self.source_dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return "kl" if type(self.vae).__name__ == "AutoencoderKL" else "tiny"

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsample(self) -> int:
        cfg = self.vae.config
        n = len(cfg.block_out_channels) if self.kind == "kl" else len(cfg.encoder_block_out_channels)
        return 2 ** (n - 1)

    @property
    def scaling_factor(self):
        """float, or a list of per-channel floats."""
        return _scalar_or_list(self.latent_scale)

    @property
    def shift_factor(self):
        return _scalar_or_list(self.latent_shift)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, image_size: int | tuple[int, int]) -> tuple[int, int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        d = self.downsample
        if h % d or w % d:
            raise ValueError(f"image size {h}x{w} is not divisible by the autoencoder's downsampling factor {d}")
        return (self.latent_channels, h // d, w // d)

    def set_normalization(self, scaling_factor, shift_factor) -> None:
        c = self.latent_channels
        self.latent_scale.copy_(_as_channel_vector(scaling_factor, c, "scaling_factor"))
        self.latent_shift.copy_(_as_channel_vector(shift_factor, c, "shift_factor"))

    # ------------------------------------------------------------------ normalisation
    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw decoder-space latents -> unit-variance latents."""
        shape = (1, -1, 1, 1)
        return (raw - self.latent_shift.to(raw).view(shape)) * self.latent_scale.to(raw).view(shape)

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        shape = (1, -1, 1, 1)
        return z / self.latent_scale.to(z).view(shape) + self.latent_shift.to(z).view(shape)

    # ------------------------------------------------------------------ encode / decode
    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4:
            raise ValueError(f"{what} must be [B,C,H,W], got shape {tuple(x.shape)}")
        if x.shape[1] != channels:
            raise ValueError(f"this autoencoder expects {channels}-channel {what}, got {x.shape[1]} channels "
                             f"(shape {tuple(x.shape)})")

    def encode_raw(self, images: torch.Tensor, sample: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Un-normalised latents (posterior mean, or a posterior sample if ``sample``)."""
        images = images_to_float(images)
        self._check(images, self.image_channels, "images")
        x = images.to(device=self.device, dtype=self.dtype)
        if self.kind == "kl":
            post = self.vae.encode(x).latent_dist
            if sample:
                eps = torch.randn(post.mean.shape, generator=generator, device=post.mean.device,
                                  dtype=post.mean.dtype) if generator is not None else torch.randn_like(post.mean)
                return post.mean + post.std * eps
            return post.mean
        return self.vae.encode(x).latents  # AutoencoderTiny is deterministic

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """images [B,C,H,W] in [-1,1] (or uint8) -> normalised latents [B,c,H/d,W/d].

        The output dtype is the input's floating dtype (float32 for uint8 input)."""
        out_dtype = images.dtype if images.is_floating_point() else torch.float32
        raw = self.encode_raw(images, sample=sample, generator=generator).float()
        return self.normalize(raw).to(out_dtype)

    def decode(self, latents: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Normalised latents -> images in [-1, 1] (clamped unless ``clamp=False``)."""
        if not latents.is_floating_point():
            raise ValueError(f"latents must be floating point, got {latents.dtype}")
        self._check(latents, self.latent_channels, "latents")
        out_dtype = latents.dtype
        raw = self.denormalize(latents.float()).to(device=self.device, dtype=self.dtype)
        x = self.vae.decode(raw).sample
        if clamp:
            x = x.clamp(-1, 1)
        return x.to(out_dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Reconstruction through the posterior mean."""
        return self.decode(self.encode(images))

    # ------------------------------------------------------------------ weights
    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.vae.state_dict().items() if k.startswith(ENCODER_PREFIXES)}

    def decoder_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.vae.state_dict().items() if not k.startswith(ENCODER_PREFIXES)}

    def decoder_parameters(self):
        return [p for n, p in self.vae.named_parameters() if not n.startswith(ENCODER_PREFIXES)]

    def encoder_fingerprint(self) -> str:
        """sha256 over everything that decides ``encode``'s output: encoder-side weights, the model
        class/config and the latent normalisation. Decoder changes leave it unchanged."""
        h = hashlib.sha256()
        h.update(type(self.vae).__name__.encode())
        cfg = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
        for name, t in sorted(self.encoder_state_dict().items()):
            h.update(name.encode())
            h.update(str(t.dtype).encode())
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        for t in (self.latent_scale, self.latent_shift):
            h.update(t.detach().cpu().float().numpy().tobytes())
        return h.hexdigest()

    def latent_space_fingerprint(self) -> str:
        """Which latent space this autoencoder reads and writes: the encoder fingerprint of the autoencoder
        it was aligned to (``train-autoencoder --align-to``), else its own. Two autoencoders with the same
        value decode the same latents, so a flow trained on one samples through the other."""
        aligned = (self.info or {}).get("aligned_to") or {}
        return aligned.get("encoder_fingerprint") or self.encoder_fingerprint()

    # ------------------------------------------------------------------ save / load
    def sidecar(self) -> dict[str, Any]:
        d = {"format": "starflow-autoencoder-v1", "scaling_factor": self.scaling_factor,
             "shift_factor": self.shift_factor, "decoder_noise_sigma": self.decoder_noise_sigma}
        if self.info:
            d["info"] = self.info
        return d

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None) -> None:
        """Write a diffusers model directory (+ sidecar). ``dtype`` (e.g. torch.float16) only changes
        the stored weights, not this module."""
        os.makedirs(directory, exist_ok=True)
        vae = self.vae
        if isinstance(self.scaling_factor, float) and isinstance(self.shift_factor, float):
            # keep the diffusers config consistent with the sidecar so diffusers users see the same numbers
            vae.register_to_config(scaling_factor=self.scaling_factor,
                                   shift_factor=self.shift_factor if self.shift_factor != 0.0 else None)
        vae.save_config(directory)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                 for k, v in vae.state_dict().items()}
        atomic_save_safetensors(state, os.path.join(directory, DIFFUSERS_WEIGHTS), metadata={"format": "pt"})
        atomic_write_bytes(os.path.join(directory, SIDECAR_NAME), json.dumps(self.sidecar(), indent=2).encode())

    @classmethod
    def from_pretrained(cls, path: str, image_channels: int | None = None, latent_channels: int | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                        backend: str = "auto") -> "Autoencoder":
        """Load a diffusers-format autoencoder directory (``--vae PATH``).

        ``path`` may be the model directory itself or a diffusers pipeline directory with a ``vae/``
        sub-folder. ``image_channels``/``latent_channels``, when given, are checked against the config
        and a mismatch is a ``ValueError`` that names both numbers.

        ``backend``: ``"diffusers"`` builds diffusers' class (what training uses); ``"native"`` starflow's own
        ``AutoencoderKL`` (same weights and outputs, no diffusers import: seconds off every command that
        samples); ``"auto"`` the native one when it covers the config, else diffusers.
        """
        if backend not in ("auto", "native", "diffusers"):
            raise ValueError(f"unknown autoencoder backend {backend!r}; expected auto, native or diffusers")
        directory = resolve_vae_dir(path)
        cfg = read_json(os.path.join(directory, DIFFUSERS_CONFIG))
        class_name = cfg.get("_class_name")
        if class_name not in SUPPORTED_CLASSES:
            hint = f"found _class_name={class_name!r}" if class_name else \
                f"config has no '_class_name' (model_type={cfg.get('model_type')!r})"
            raise ValueError(f"{directory} is not a diffusers autoencoder directory: expected config.json with "
                             f"_class_name 'AutoencoderKL' (or 'AutoencoderTiny'), {hint}")
        check_channels(directory, cfg, image_channels, latent_channels)
        weights = os.path.join(directory, DIFFUSERS_WEIGHTS)
        if not os.path.exists(weights):
            present = sorted(f for f in os.listdir(directory) if f != DIFFUSERS_CONFIG)
            raise FileNotFoundError(f"{directory} has no {DIFFUSERS_WEIGHTS} (expected diffusers-format safetensors "
                                    f"weights; found {present or 'nothing else'}). Pickled .bin weights are not loaded.")
        if backend == "native" and not autoencoder_kl.supports(cfg):
            raise ValueError(f"{directory}: this {class_name} layout needs diffusers (backend='diffusers' or 'auto')")
        if backend != "diffusers" and autoencoder_kl.supports(cfg):
            vae = autoencoder_kl.AutoencoderKL.from_pretrained(directory, cfg, weights, dtype)
        else:
            vae = _load_diffusers(directory, class_name, dtype)

        check_finite(vae.state_dict(), f"weights of {directory}")
        side = {}
        sidecar_path = os.path.join(directory, SIDECAR_NAME)
        if os.path.exists(sidecar_path):
            side = read_json(sidecar_path)
        ae = cls(vae, scaling_factor=side.get("scaling_factor"), shift_factor=side.get("shift_factor"),
                 decoder_noise_sigma=side.get("decoder_noise_sigma"), info=side.get("info"))
        ae.source_dir = directory
        ae.source_dtype = stored_dtype(weights)
        ae.eval()
        if device is not None:
            ae.to(device)
        return ae


def _load_diffusers(directory: str, class_name: str, dtype: torch.dtype) -> nn.Module:
    """diffusers' own class, imported from its module: the package root would import diffusers' whole
    pipeline tree (several seconds on every command that loads a latent model)."""
    if class_name == "AutoencoderKL":
        from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL as model_cls
    else:
        from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTiny as model_cls
    try:
        vae, info = model_cls.from_pretrained(directory, use_safetensors=True, local_files_only=True,
                                              low_cpu_mem_usage=False, output_loading_info=True, torch_dtype=dtype)
    except (OSError, ValueError, RuntimeError, TypeError, KeyError) as e:
        raise ValueError(f"could not load {class_name} weights from {directory}: {e}") from e
    missing = list(info.get("missing_keys", []))
    mismatched = list(info.get("mismatched_keys", []))
    if missing or mismatched:
        raise ValueError(f"weights in {directory} do not match its config.json: missing {missing[:5]}, "
                         f"mismatched {mismatched[:5]}")
    return vae


def default_autoencoder_dir(name: str = "mnist") -> str:
    if name not in DEFAULT_AUTOENCODERS:
        raise ValueError(f"unknown default autoencoder {name!r}; expected one of {sorted(DEFAULT_AUTOENCODERS)}")
    try:
        from importlib.resources import files

        d = str(files("starflow") / "assets" / DEFAULT_AUTOENCODERS[name])
    except (ImportError, ModuleNotFoundError, TypeError):
        d = os.path.join(ASSETS_DIR, DEFAULT_AUTOENCODERS[name])
    return d


def available_default_autoencoders() -> list[str]:
    return [n for n in DEFAULT_AUTOENCODERS
            if os.path.exists(os.path.join(default_autoencoder_dir(n), DIFFUSERS_WEIGHTS))]


def load_default_autoencoder(name: str = "mnist", device: str | torch.device | None = None) -> Autoencoder:
    """Load a committed autoencoder from ``starflow/assets`` (no network).

    ``"mnist"``: 1x28x28 -> 4x7x7. ``"mnist_ft"``: same encoder, decoder fine-tuned for σ=0.3 latent
    noise. ``"shapes"``/``"shapes_ft"``: 3x32x32 -> 4x8x8, when shipped."""
    d = default_autoencoder_dir(name)
    if not os.path.exists(os.path.join(d, DIFFUSERS_WEIGHTS)):
        raise FileNotFoundError(f"default autoencoder {name!r} is not shipped in this install (looked in {d}); "
                                f"available: {available_default_autoencoders()}")
    return Autoencoder.from_pretrained(d, device=device)


def resolve_autoencoder(spec: str, device=None, image_channels: int | None = None) -> Autoencoder:
    """``spec`` is a default name (``mnist``, ``mnist_ft``, ...) or a directory path (``--vae PATH``)."""
    if spec in DEFAULT_AUTOENCODERS and not os.path.isdir(spec):
        ae = load_default_autoencoder(spec, device=device)
        if image_channels is not None and ae.image_channels != image_channels:
            raise ValueError(f"default autoencoder {spec!r} takes {ae.image_channels}-channel images but the data "
                             f"has {image_channels} channels")
        return ae
    return Autoencoder.from_pretrained(spec, image_channels=image_channels, device=device)
