"""Sampling grids (sigma schedules) for the rectified-flow Euler sampler; t = sigma = 1 is noise.

Two grids, both returned as N + 1 decreasing sigmas ending at 0:

- "sd3" (the reference; default for sampling): SD3's and diffusers' FlowMatchEulerDiscreteScheduler
  grid. Training timesteps are the 1000 values k / 1000, k = 1..1000; the sampler takes N values
  evenly spaced between the largest and smallest of them (after the shift, when the shift is
  static), shifts them again, and appends 0. Its last non-zero sigma is ~0.009 at shift 3, so the
  final Euler step is tiny.
- "uniform" (the grid starflow used before): shift(linspace(1, 0, N + 1)). Its last step is large
  (sigma 0.25 -> 0 at N = 10, shift 3), which costs accuracy at small N.

Dynamic ("resolution-dependent") shifting replaces the static shift by the exponential time shift
exp(mu) / (exp(mu) + (1/sigma - 1)), with mu interpolated linearly in the image token count
(`dynamic_shift_mu`). `diffusers_sigmas` asks diffusers' scheduler itself, for tests and for
callers that want the library's numbers verbatim.
"""
from __future__ import annotations

import math

import numpy as np
import torch

SCHEDULES = ("sd3", "uniform")


def static_shift(sigma, alpha: float):
    """SD3 shift alpha s / (1 + (alpha - 1) s) (the same formula as training's resolution shift)."""
    return alpha * sigma / (1 + (alpha - 1) * sigma)


def exponential_time_shift(sigma, mu: float):
    """exp(mu) / (exp(mu) + (1/sigma - 1)): the shift used with dynamic shifting (mu = log alpha
    gives the static shift alpha)."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def dynamic_shift_mu(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                     base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """mu for an image of `image_seq_len` patch tokens: linear from base_shift at base_seq_len to
    max_shift at max_seq_len (the reference pipelines' defaults)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def uniform_sigmas(steps: int, shift: float = 1.0, device=None) -> torch.Tensor:
    """starflow's earlier grid: the shifted uniform grid linspace(1, 0, steps + 1)."""
    check_steps(steps)
    return static_shift(torch.linspace(1.0, 0.0, steps + 1, device=device), shift)


def sd3_sigmas(steps: int, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000,
               device=None) -> torch.Tensor:
    """SD3's reference grid (float32, as the reference computes it). mu given: dynamic shifting
    (the exponential time shift with that mu; `shift` is then unused, as in the reference)."""
    check_steps(steps)
    train = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1] / num_train_timesteps
    if mu is None:  # the static shift is already applied to the training timesteps' range
        train = static_shift(train, shift)
    sigma_max, sigma_min = float(train[0]), float(train[-1])
    sigmas = np.linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps) / num_train_timesteps
    sigmas = exponential_time_shift(sigmas, mu) if mu is not None else static_shift(sigmas, shift)
    sigmas = torch.from_numpy(np.asarray(sigmas)).to(torch.float32)
    return torch.cat([sigmas, torch.zeros(1)]).to(device)


def diffusers_sigmas(steps: int, shift: float = 1.0, mu: float | None = None, device=None) -> torch.Tensor:
    """The same grid straight from diffusers' FlowMatchEulerDiscreteScheduler (needs diffusers)."""
    scheduler = make_diffusers_scheduler(shift, dynamic=mu is not None)
    scheduler.set_timesteps(steps, mu=mu)
    return scheduler.sigmas.to(device)


def make_diffusers_scheduler(shift: float = 1.0, dynamic: bool = False):
    try:
        from diffusers import FlowMatchEulerDiscreteScheduler
    except ImportError as e:  # an optional dependency: only this sampler option needs it
        raise ImportError("the diffusers sampler needs the `diffusers` package (pip install diffusers)") from e
    return FlowMatchEulerDiscreteScheduler(shift=shift, use_dynamic_shifting=dynamic)


def flowar_sigmas(steps: int, device=None) -> torch.Tensor:
    """The official FlowAR sampler's per-scale grid: steps // 2 values from 1 down to 0.3, then
    steps // 2 + 1 from 0.25 down to 0 (so an odd `steps` takes steps - 1 Euler steps); the plain
    uniform grid when steps == 50."""
    if steps == 50:
        return torch.linspace(1.0, 0.0, 51, dtype=torch.float64).float().to(device)
    if steps < 2:
        raise ValueError(f"the FlowAR grid needs steps >= 2, got {steps}")
    grid = torch.cat([torch.linspace(1.0, 0.3, steps // 2, dtype=torch.float64),
                      torch.linspace(0.25, 0.0, steps // 2 + 1, dtype=torch.float64)])
    return grid.float().to(device)


def schedule_sigmas(schedule: str, steps: int, shift: float = 1.0, mu: float | None = None,
                    device=None) -> torch.Tensor:
    """The grid named `schedule` (one of SCHEDULES)."""
    if schedule == "sd3":
        return sd3_sigmas(steps, shift, mu, device=device)
    if schedule == "uniform":
        if mu is not None:
            raise ValueError("dynamic shifting (mu) is defined for the sd3 schedule only")
        return uniform_sigmas(steps, shift, device=device)
    raise ValueError(f"unknown sampling schedule {schedule!r}; choose one of {SCHEDULES}")


def check_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """A usable grid: 1-D, at least two values, strictly decreasing, inside [0, 1]."""
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if sigmas.numel() < 2:
        raise ValueError("a sigma schedule needs at least 2 values (start and end)")
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas.min()) < 0 or float(sigmas.max()) > 1:
        raise ValueError("sigmas must decrease strictly and lie in [0, 1] (1 = noise, 0 = data)")
    return sigmas


def check_steps(steps: int) -> None:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
