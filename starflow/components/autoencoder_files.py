"""Diffusers autoencoder directories on disk: file names, finding the VAE folder, reading and checking
its config, the stored weight dtype. ``components.autoencoder`` builds the model from them.
"""
from __future__ import annotations

import json
import os

import torch

SIDECAR_NAME = "starflow_autoencoder.json"
DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
SUPPORTED_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
# Parameters whose names start with these belong to the encoder side (they decide the latents).
ENCODER_PREFIXES = ("encoder.", "quant_conv.")


def stored_dtype(weights_path: str) -> torch.dtype | None:
    """dtype of the floating tensors in a safetensors file (first one found)."""
    from safetensors import safe_open

    with safe_open(weights_path, framework="pt") as f:
        for k in f.keys():
            t = f.get_slice(k)
            dt = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64}.get(
                t.get_dtype())
            if dt is not None:
                return dt
    return None


def read_json(path: str) -> dict:
    try:
        with open(path) as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt JSON in {path}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return d


def resolve_vae_dir(path: str) -> str:
    if not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder directory not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"--vae expects a diffusers model directory (config.json + {DIFFUSERS_WEIGHTS}), "
                         f"got a file: {path}")
    if os.path.exists(os.path.join(path, DIFFUSERS_CONFIG)):
        cfg_path = os.path.join(path, DIFFUSERS_CONFIG)
        try:
            with open(cfg_path) as f:
                is_vae = json.load(f).get("_class_name") in SUPPORTED_CLASSES
        except (json.JSONDecodeError, AttributeError):
            is_vae = False
        if is_vae or not os.path.isdir(os.path.join(path, "vae")):
            return path
    sub = os.path.join(path, "vae")
    if os.path.exists(os.path.join(sub, DIFFUSERS_CONFIG)):
        return sub  # a diffusers pipeline folder
    raise FileNotFoundError(f"{path} is not a diffusers autoencoder directory: expected {DIFFUSERS_CONFIG} and "
                            f"{DIFFUSERS_WEIGHTS} (or a pipeline folder with a vae/ sub-folder)")


def check_channels(directory: str, cfg: dict, image_channels: int | None, latent_channels: int | None) -> None:
    in_ch, out_ch, lat = cfg.get("in_channels", 3), cfg.get("out_channels", 3), cfg.get("latent_channels", 4)
    if in_ch != out_ch:
        raise ValueError(f"autoencoder at {directory} maps {in_ch}-channel images to {out_ch}-channel outputs; "
                         f"expected in_channels == out_channels")
    if image_channels is not None and in_ch != image_channels:
        raise ValueError(f"autoencoder at {directory} takes {in_ch}-channel images (config in_channels={in_ch}) "
                         f"but the data has {image_channels} channels; expected in_channels={image_channels}")
    if latent_channels is not None and lat != latent_channels:
        raise ValueError(f"autoencoder at {directory} has {lat} latent channels (config latent_channels={lat}) "
                         f"but {latent_channels} were expected")
