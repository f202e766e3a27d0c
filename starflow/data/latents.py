"""Latent datasets: encode a dataset once with an autoencoder and cache the latents on disk.

The cache file is a safetensors file under ``cache_dir`` whose name holds a key: sha256 over the
autoencoder's *encoder* fingerprint (encoder weights, config and latent normalisation — see
``Autoencoder.encoder_fingerprint``), the dataset name/split, whether flips were added, and the bytes of
the images themselves. Change the encoder, its normalisation or the data and the key changes, so a stale
cache is never read. A decoder-only change (``finetune-decoder``) keeps the key: latents do not depend
on the decoder.

Latents are the (normalised) posterior *means*; noise for training is added per step with
``add_latent_noise``. Labels: integer labels are stored as a tensor; string captions (if a dataset
returns them) are stored in the file's metadata.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch.utils.data import Dataset

from starflow.components.autoencoder import Autoencoder, resolve_autoencoder
from starflow.data.registry import load_named_dataset  # noqa: F401  (kept importable here)
from starflow.io.hub import atomic_save_safetensors

CACHE_VERSION = "1"


def default_cache_dir() -> str:
    return os.environ.get("STARFLOW_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "starflow", "latents"))


def add_latent_noise(z: torch.Tensor, sigma: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z + σ·ε with ε ~ N(0, I) (STARFlow's noise injection; official σ = 0.3 on unit-variance latents)."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return z
    if generator is None:
        eps = torch.randn_like(z)
    else:
        eps = torch.randn(z.shape, generator=generator, device=generator.device, dtype=z.dtype).to(z.device)
    return z + sigma * eps


def dataset_images(dataset) -> torch.Tensor:
    """All images of a dataset as one uint8 tensor [N,C,H,W] (uses ``dataset.images`` when present)."""
    imgs = getattr(dataset, "images", None)
    if callable(imgs):  # e.g. ShapesDataset.images()
        imgs = imgs()
    if isinstance(imgs, torch.Tensor) and imgs.ndim == 4:
        return imgs
    items = [dataset[i][0] for i in range(len(dataset))]
    if not items:
        raise ValueError("dataset is empty")
    return torch.stack([torch.as_tensor(x) for x in items])


def dataset_labels(dataset) -> torch.Tensor | list:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    out = []
    for i in range(len(dataset)):
        item = dataset[i]
        out.append(item[1] if isinstance(item, (tuple, list)) and len(item) > 1 else -1)
    if all(isinstance(v, (int, torch.Tensor)) and torch.as_tensor(v).numel() == 1 for v in out):
        return torch.tensor([int(v) for v in out], dtype=torch.long)
    return [str(v) for v in out]


@torch.no_grad()
def encode_images(autoencoder, images: torch.Tensor, batch_size: int = 250, flip: bool = False) -> torch.Tensor:
    """Normalised posterior-mean latents of uint8/float images, float32 on CPU. ``flip`` appends the
    latents of the horizontally flipped images (so the result has 2N rows)."""
    was_training = autoencoder.training
    autoencoder.eval()
    try:
        chunks = []
        for src in ([images, images.flip(-1)] if flip else [images]):
            for i in range(0, len(src), batch_size):
                chunks.append(autoencoder.encode(src[i:i + batch_size]).float().cpu())
        return torch.cat(chunks)
    finally:
        autoencoder.train(was_training)


def cache_key(autoencoder, name: str, split: str, flip: bool, images: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"v{CACHE_VERSION}|{name}|{split}|flip={bool(flip)}|{tuple(images.shape)}|{images.dtype}".encode())
    h.update(autoencoder.encoder_fingerprint().encode())
    h.update(images.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
             if images.dtype == torch.uint8 else images.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()


def _safe_name(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)[:60]


class LatentDataset(Dataset):
    """(latent, label) pairs from a cached encode of ``dataset``.

    Args:
        autoencoder: a ``starflow.components.autoencoder.Autoencoder``.
        dataset: any dataset whose items are ``(image uint8 [C,H,W], label, ...)`` (or with an
            ``.images`` tensor attribute).
        name, split: identify the data in the cache file name and key.
        cache_dir: where to keep the cache (``None``: ``$STARFLOW_CACHE`` or ``~/.cache/starflow/latents``;
            ``False``: no disk cache).
        flip: also cache horizontally flipped images (items N..2N-1 are the flips). Not for digits.

    ``self.from_cache`` says whether the latents were read from disk.
    """

    def __init__(self, autoencoder, dataset, name: str, split: str = "train", cache_dir: str | None | bool = None,
                 flip: bool = False, batch_size: int = 250):
        images = dataset_images(dataset)
        labels = dataset_labels(dataset)
        self.name, self.split, self.flip = name, split, flip
        self.key = cache_key(autoencoder, name, split, flip, images)
        self.from_cache = False
        self.path = None
        if cache_dir is not False:
            cache_dir = cache_dir or default_cache_dir()
            self.path = os.path.join(cache_dir, f"{_safe_name(name)}-{_safe_name(split)}"
                                                f"{'-flip' if flip else ''}-{self.key[:20]}.safetensors")
        latents = self._load() if self.path else None
        if latents is None:
            latents = encode_images(autoencoder, images, batch_size=batch_size, flip=flip)
            if self.path:
                self._save(latents, labels)
        else:
            self.from_cache = True
        self.latents = latents
        base = labels if isinstance(labels, list) else labels.long()
        self.labels = (base + base if isinstance(base, list) else torch.cat([base, base])) if flip else base
        self.downsample = autoencoder.downsample

    def _load(self):
        if not os.path.exists(self.path):
            return None
        from safetensors import safe_open

        try:
            with safe_open(self.path, framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("key") != self.key:
                    return None
                return f.get_tensor("latents")
        except Exception:  # unreadable/corrupt cache: rebuild it
            return None

    def _save(self, latents, labels):
        meta = {"key": self.key, "name": self.name, "split": self.split, "flip": str(self.flip),
                "version": CACHE_VERSION}
        if isinstance(labels, list):
            meta["captions"] = json.dumps(labels)
        atomic_save_safetensors({"latents": latents}, self.path, metadata=meta)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.latents.shape[1:])

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i], self.labels[i]


def build_latent_dataset(name: str, split: str = "train", autoencoder="mnist", cache_dir: str | None | bool = None,
                         flip: bool = False, device=None, image_size: int | None = None) -> LatentDataset:
    """Latent dataset of a named dataset. ``autoencoder``: an ``Autoencoder``, a shipped name
    (``mnist``, ``mnist_ft``, ``shapes``, ...) or a diffusers directory (``--vae PATH``)."""
    ds = load_named_dataset(name, split, image_size=image_size)
    if not isinstance(autoencoder, Autoencoder):
        autoencoder = resolve_autoencoder(str(autoencoder), device=device)
    c = dataset_images(ds).shape[1]
    if c != autoencoder.image_channels:
        raise ValueError(f"dataset {name!r} has {c}-channel images but the autoencoder expects "
                         f"{autoencoder.image_channels}-channel images")
    return LatentDataset(autoencoder, ds, name, split, cache_dir=cache_dir, flip=flip)
