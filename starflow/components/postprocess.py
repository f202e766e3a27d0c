"""The last step of every generation path: a raw flow sample -> images in [-1, 1].

Models trained on data plus Gaussian noise (``noise_std`` > 0) sample noisy data. It is cleaned in
one of two ways, recorded with a saved pipeline as ``denoise``:

* ``"tweedie"``: one score step through the flow's exact density (``components.denoise``), then decode;
* ``"decoder"``: decode with an autoencoder whose decoder was fine-tuned on noisy latents;
* ``"none"``: decode as is.

Sampling (the pipeline), inpainting and editing all end here, so they clean and decode alike.
"""
from __future__ import annotations

from typing import Callable

import torch

from starflow.components.denoise import clean_latents

DENOISE = ("decoder", "tweedie", "none")


def denoise_and_decode(x: torch.Tensor, denoise: str, noise_std: float,
                       log_prob_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, autoencoder=None,
                       keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Clean a raw sample ``x`` (model space) per ``denoise``, decode it if there is an ``autoencoder``,
    clamp to [-1, 1].

    ``log_prob_fn``: the flow's per-example log-density for Tweedie (None for models without an exact
    one: they skip it). ``keep = (mask, values)``: where ``mask`` is True the cleaned sample is replaced
    by ``values`` before decoding (inpainting keeps its known region as given)."""
    if denoise not in DENOISE:
        raise ValueError(f"unknown denoise {denoise!r}; expected one of {DENOISE}")
    if denoise == "tweedie" and noise_std > 0 and log_prob_fn is not None:
        cleaned = clean_latents(x, noise_std, "tweedie", log_prob_fn)
        x = cleaned if keep is None else torch.where(keep[0], keep[1], cleaned)
    if autoencoder is not None:
        x = autoencoder.decode(x)
    return x.clamp(-1, 1)


__all__ = ["DENOISE", "denoise_and_decode"]
