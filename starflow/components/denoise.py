"""Score denoising (TARFlow's way of cleaning a noisy sample): one Tweedie step

    x̂ = x̃ + σ² ∇_x̃ log p(x̃),

where p is the density of the *noisy* data (which is what a flow trained on z + σε models) and the
gradient is taken through the model's exact log-density. For x ~ p_0 and x̃ = x + σε this is the
posterior mean E[x | x̃] (Tweedie's formula).

``log_prob_fn(x)`` must return the per-example log-density in nats, summed over all dimensions
(not averaged per dimension, not bits/dim), shape [B]; examples must not interact (eval mode, no
batch statistics). For a conditional flow pass ``lambda x: model.log_prob(x, y)``.
"""
from __future__ import annotations

from typing import Callable

import torch


def score(log_prob_fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """∇_x log p(x) per example (same shape as x), via autograd."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        lp = log_prob_fn(xg)
        if lp.ndim != 1 or lp.shape[0] != x.shape[0]:
            raise ValueError(f"log_prob_fn must return one log-density per example, shape [{x.shape[0]}]; "
                             f"got {tuple(lp.shape)}")
        (g,) = torch.autograd.grad(lp.sum(), xg)
    return g.detach()


def tweedie_denoise(log_prob_fn: Callable[[torch.Tensor], torch.Tensor], x_noisy: torch.Tensor, sigma: float,
                    batch_size: int | None = None) -> torch.Tensor:
    """x̂ = x̃ + σ² ∇ log p(x̃). ``batch_size`` splits the gradient computation to bound memory."""
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return x_noisy.detach().clone()
    n = x_noisy.shape[0]
    bs = batch_size or n
    grads = [score(log_prob_fn, x_noisy[i:i + bs]) for i in range(0, n, bs)]
    return (x_noisy.detach() + (sigma ** 2) * torch.cat(grads)).to(x_noisy.dtype)


def clean_latents(z_noisy: torch.Tensor, sigma: float, method: str = "tweedie",
                  log_prob_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  batch_size: int | None = None) -> torch.Tensor:
    """Select how a noisy flow sample is cleaned before decoding.

    ``"tweedie"``: score denoising through ``log_prob_fn``; ``"none"``/``"decoder"``: return the latents
    unchanged (use with a decoder fine-tuned for σ, e.g. ``load_default_autoencoder("mnist_ft")``)."""
    if method == "tweedie":
        if log_prob_fn is None:
            raise ValueError("method='tweedie' needs log_prob_fn (the flow's exact log-density)")
        return tweedie_denoise(log_prob_fn, z_noisy, sigma, batch_size=batch_size)
    if method in ("none", "decoder"):
        return z_noisy
    raise ValueError(f"unknown denoising method {method!r}; expected 'tweedie', 'decoder' or 'none'")
