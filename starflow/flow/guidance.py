"""Classifier-free guidance for autoregressive flows (DESIGN.md §3 "Guidance").

Each inverse step of a conditional block predicts a Gaussian for token i, N(mu, sigma^2) with
sigma = exp(alpha), once with the condition (c) and once with the null condition (u).

* ``tarflow``: extrapolate both parameters, mu <- mu_c + w (mu_c - mu_u), alpha <- alpha_c + w (alpha_c - alpha_u).
* ``tarflow-annealed``: the same with w ramped linearly from 0 at the first token to w at the last.
* ``starflow``: sample from the tilted density p_c^(1+w) / p_u^w, again Gaussian:
      s = min(sigma_c / sigma_u, 1)^2
      sigma = sigma_c / sqrt(1 + w - w s),   mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)
  The clip s <= 1 keeps the precision (1 + w - w s) / sigma_c^2 >= 1 / sigma_c^2 > 0 for every w.
"""
from __future__ import annotations

import math

import torch

RULES = ("starflow", "tarflow", "tarflow-annealed")


def check_guidance(weight: float, rule: str) -> None:
    if rule not in RULES:
        raise ValueError(f"unknown guidance rule {rule!r}; expected one of {', '.join(RULES)}")
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ValueError(f"guidance weight must be a finite number >= 0, got {weight!r}")


def guide(rule: str, w: float, mu_c, alpha_c, mu_u, alpha_u, positions: torch.Tensor | None = None,
          num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine conditional and unconditional Gaussians [B, T, D]; ``positions`` [T] are token indices
    in the block's order (needed by the annealed rule)."""
    if rule == "starflow":
        s = torch.exp(2.0 * torch.clamp(alpha_c - alpha_u, max=0.0))  # min(sigma_c/sigma_u, 1)^2
        denom = 1.0 + w - w * s
        return ((1.0 + w) * mu_c - w * s * mu_u) / denom, alpha_c - 0.5 * torch.log(denom)
    if rule == "tarflow":
        return mu_c + w * (mu_c - mu_u), alpha_c + w * (alpha_c - alpha_u)
    if rule == "tarflow-annealed":
        ramp = positions.to(mu_c.dtype) / max(num_tokens - 1, 1)
        wt = (w * ramp)[None, :, None]
        return mu_c + wt * (mu_c - mu_u), alpha_c + wt * (alpha_c - alpha_u)
    raise ValueError(f"unknown guidance rule {rule!r}; expected one of {', '.join(RULES)}")
