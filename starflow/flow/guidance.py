"""Classifier-free guidance for autoregressive flows (DESIGN.md §3 "Guidance").

Each inverse step of a conditional block predicts a Gaussian for token i, N(mu, sigma^2) with
sigma = exp(alpha), once with the condition (c) and once with the null condition (u).

* ``tarflow``: extrapolate both parameters, mu <- mu_c + w (mu_c - mu_u), alpha <- alpha_c + w (alpha_c - alpha_u).
* ``tarflow-annealed``: the same with w ramped linearly from 0 at the first token to w at the last.
* ``starflow``: sample from the tilted density p_c^(1+w) / p_u^w, again Gaussian:
      s = min(sigma_c / sigma_u, 1)^2
      sigma = sigma_c / sqrt(1 + w - w s),   mu = ((1 + w) mu_c - w s mu_u) / (1 + w - w s)
  The clip s <= 1 keeps the precision (1 + w - w s) / sigma_c^2 >= 1 / sigma_c^2 > 0 for every w.

``Guidance`` is the one object a sampler is handed: the weight and the rule as one typed value, and both
halves of the mechanism, the batch doubling (``pair``, ``feed``) and the combining (``combine``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from starflow.flow.condition import Condition

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


@dataclass(frozen=True)
class Guidance:
    """Classifier-free guidance of a flow: weight ``w`` >= 0 and ``rule`` (one of ``RULES``). A guided block
    runs a batch of 2B rows, the condition then the unconditional branch, and combines each token's two
    Gaussians with the rule."""
    weight: float = 0.0
    rule: str = "starflow"

    def __post_init__(self):
        check_guidance(self.weight, self.rule)

    @classmethod
    def of(cls, value: "float | Guidance", rule: str = "starflow") -> "Guidance":
        """A weight (and rule) or a ``Guidance`` -> a ``Guidance``."""
        if isinstance(value, Guidance):
            if rule != "starflow" and rule != value.rule:
                raise ValueError(f"guidance rule given twice: {value.rule!r} in the Guidance and {rule!r}")
            return value
        return cls(value, rule)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def pair(self, cond: Condition, negative: Condition | None = None) -> Condition:
        """The doubled condition: rows of ``cond``, then the unconditional branch (``negative``, or the null)."""
        return cond.cat(negative if negative is not None else cond.null())

    @staticmethod
    def feed(x: torch.Tensor) -> torch.Tensor:
        """Decoded tokens go to both halves of the doubled batch."""
        return torch.cat([x, x])

    def combine(self, mu: torch.Tensor, alpha: torch.Tensor, positions: torch.Tensor | None = None,
                num_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, alpha) of the doubled batch [2B, T, D] -> the guided (mu, alpha) [B, T, D]. One token may
        come as [2B, D] (the lean sequential decoder)."""
        if mu.ndim == 2:
            m, a = self.combine(mu[:, None], alpha[:, None], positions, num_tokens)
            return m[:, 0], a[:, 0]
        mu_c, mu_u = mu.chunk(2)
        alpha_c, alpha_u = alpha.chunk(2)
        return guide(self.rule, self.weight, mu_c, alpha_c, mu_u, alpha_u, positions, num_tokens)


def guidance_weight(value) -> float:
    """The weight of a number or a ``Guidance`` (for callers that only ask whether guidance is on)."""
    return value.weight if isinstance(value, Guidance) else value
