"""Rectified flow as in SD3 (Esser et al. 2024, arXiv 2403.03206).

Time convention (used by every peer in this package): t = 0 is DATA, t = 1 is NOISE.

    z_t = (1 - t) * x0 + t * eps,      eps ~ N(0, I)
    v   = dz_t/dt = eps - x0           (the network's regression target)

Training draws t from a timestep sampler (logit-normal, "mode", cosmap or uniform; optionally
resolution-shifted) and minimises ||v_theta(z_t, t, c) - (eps - x0)||^2. Sampling integrates the
ODE dz/dt = v from t = 1 (pure noise) down to t = 0 with Euler steps.

Guidance convention (the same for every model of the harness, so `guidance=0` always means "no
guidance, plain conditional sampling"):  v = v_c + w (v_c - v_u)  =  v_u + (1 + w)(v_c - v_u).
SD3's "CFG scale" lambda in  v_u + lambda (v_c - v_u)  is therefore  w = lambda - 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from starflow.io.hub import PretrainedMixin
from starflow.schema import check_model_memory, check_types, transformer_params
from starflow.peers.mmdit import Condition, ConditionEncoder, MMDiT

TIMESTEP_SAMPLERS = ("logit-normal", "mode", "cosmap", "uniform")
MODE_SCALE_MAX = 2.0 / (math.pi - 2.0)  # ~1.752; beyond it the mode map is not monotone


# --------------------------------------------------------------------------------------------
# Path, target, timesteps
# --------------------------------------------------------------------------------------------


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z_t = (1 - t) x0 + t eps, with t [B] broadcast over the remaining dims."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d z_t / dt along the straight path: eps - x0 (independent of t)."""
    return noise - x0


def shift_timesteps(t: torch.Tensor, alpha: float) -> torch.Tensor:
    """SD3 resolution shift t' = alpha t / (1 + (alpha - 1) t). alpha > 1 spends more time near
    noise (larger images need it: more pixels keep more signal at a given noise level). Fixes
    t = 0 and t = 1, monotone, identity at alpha = 1."""
    if alpha <= 0:
        raise ValueError(f"shift alpha must be > 0, got {alpha}")
    return alpha * t / (1 + (alpha - 1) * t)


def mode_map(u: torch.Tensor, s: float) -> torch.Tensor:
    """SD3 "mode sampling with heavy tails": t = 1 - u - s (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1).
    s > 0 concentrates t around the middle, s < 0 towards the ends; s = 0 is uniform."""
    return 1 - u - s * (torch.cos(math.pi / 2 * u) ** 2 - 1 + u)


@dataclass
class TimestepSampler:
    """Draws training timesteps t in [0, 1] (t = 1 noise).

    kind: "logit-normal" (t = sigmoid(m + s n), n ~ N(0,1); SD3's best: m=0, s=1),
          "mode" (heavy-tailed mode sampling with scale `mode_scale`),
          "cosmap" (t = 1 - 1 / (tan(pi u / 2) + 1)),
          "uniform".
    shift: resolution shift alpha applied after drawing (1 = none).
    """

    kind: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0

    def __post_init__(self):
        if self.kind not in TIMESTEP_SAMPLERS:
            raise ValueError(f"unknown timestep sampler {self.kind!r}; choose one of {TIMESTEP_SAMPLERS}")
        if self.kind == "logit-normal" and not self.logit_std > 0:
            raise ValueError(f"logit_std must be > 0 for the logit-normal sampler, got {self.logit_std}")
        if self.kind == "mode" and not (-1.0 <= self.mode_scale <= MODE_SCALE_MAX):
            # Outside this range dt/du changes sign, so the map folds over and is no longer a
            # density transform of U(0, 1) (and can leave [0, 1]).
            raise ValueError(
                f"mode_scale must lie in [-1, 2/(pi-2) = {MODE_SCALE_MAX:.4f}] for the mode sampler "
                f"to be monotone, got {self.mode_scale}"
            )
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def __call__(self, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else device
        if self.kind == "logit-normal":
            t = torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, generator=generator, device=gen_device))
        else:
            u = torch.rand(n, generator=generator, device=gen_device)
            if self.kind == "mode":
                t = mode_map(u, self.mode_scale)
            elif self.kind == "cosmap":
                t = 1 - 1 / (torch.tan(math.pi / 2 * u) + 1)
            else:
                t = u
        t = t.clamp(0.0, 1.0)  # guards rounding at the ends (e.g. tan near pi/2)
        if self.shift != 1.0:
            t = shift_timesteps(t, self.shift)
        return t.to(device) if device is not None else t


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                 steps: int, shift: float = 1.0) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from t = 1 (noise) to t = 0 (data) with `steps` Euler steps
    on the (optionally shifted) uniform grid. velocity gets z [B, ...] and t [B]. State kept in
    float32 so low-precision velocities do not accumulate rounding over many steps."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ts = shift_timesteps(torch.linspace(1.0, 0.0, steps + 1, device=noise.device), shift)
    z = noise.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(z, t.expand(z.shape[0]))
        z = z + (t_next - t) * v.float()
    return z


def guided(v_cond: torch.Tensor, v_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Classifier-free guidance on velocity: v_c + w (v_c - v_u); w = 0 is plain conditional."""
    return v_cond + w * (v_cond - v_uncond)


def randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Noise drawn on the generator's device (so a seed gives the same numbers anywhere), then moved."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def batch_size_of(n: int, y: torch.Tensor | None, text) -> int:
    if y is not None and y.shape[0] != n:
        raise ValueError(f"asked for n={n} samples but got {y.shape[0]} class labels")
    if text is not None and text[0].shape[0] != n:
        raise ValueError(f"asked for n={n} samples but got {text[0].shape[0]} text conditions")
    return n


def repeat_condition(y: torch.Tensor | None, text):
    """Stack a condition twice along the batch (rows [cond; uncond] for one CFG forward pass)."""
    y2 = None if y is None else torch.cat([y, y])
    if text is None:
        return y2, None
    states, mask, pooled = text
    return y2, (torch.cat([states, states]), None if mask is None else torch.cat([mask, mask]),
                None if pooled is None else torch.cat([pooled, pooled]))


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class RectifiedFlowConfig:
    in_channels: int = 4
    image_size: int = 8
    patch_size: int = 2
    num_classes: int = 0  # 0 = not class-conditional
    cond_dim: int = 0  # text-state width, 0 = not text-conditional
    pooled_dim: int = 0  # pooled text vector width, 0 = pool the states (masked mean)
    cond_drop_prob: float = 0.1  # condition -> learned null during training (enables CFG)
    num_class_tokens: int = 1
    width: int = 256
    depth: int = 6
    heads: int = 4
    mlp_ratio: float = 4.0
    timestep_sampler: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    shift: float = 1.0  # resolution shift alpha, used for training timesteps AND the sampling grid
    sample_steps: int = 50

    def __post_init__(self):
        check_types(self)
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        for name in ("in_channels", "image_size", "patch_size", "width", "depth", "heads", "sample_steps",
                     "num_class_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        self.timesteps()  # validates the sampler parameters now, not at the first training step
        tokens = (self.image_size // self.patch_size) ** 2
        # MM-DiT: two streams of layers (image and condition); activations of one example.
        check_model_memory(2 * transformer_params(self.width, self.depth, self.mlp_ratio)
                           + (self.num_classes + self.cond_dim + self.pooled_dim + tokens) * self.width,
                           self.depth * tokens * (self.width * (4 + self.mlp_ratio) + tokens * self.heads))

    def timesteps(self) -> TimestepSampler:
        return TimestepSampler(self.timestep_sampler, self.logit_mean, self.logit_std, self.mode_scale, self.shift)


class RectifiedFlow(nn.Module, PretrainedMixin):
    """SD3-style rectified flow with an MM-DiT velocity network."""

    config_class = RectifiedFlowConfig
    model_type = "rectified-flow"

    def __init__(self, config: RectifiedFlowConfig):
        super().__init__()
        self.config = config
        self.condition = ConditionEncoder(config.width, config.num_classes, config.cond_dim, config.pooled_dim,
                                          config.num_class_tokens)
        self.net = MMDiT(config.in_channels, config.image_size, config.patch_size, config.width, config.depth,
                         config.heads, config.mlp_ratio)
        self.timestep_sampler = config.timesteps()

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def velocity(self, z: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
        return self.net(z, t, cond)

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"x must be [B, {c.in_channels}, {c.image_size}, {c.image_size}], got {tuple(x.shape)}")

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, text=None, *, noise: torch.Tensor | None = None,
             t: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Mean squared velocity error. `noise` / `t` may be passed to make the loss deterministic
        (t is then used as given, unshifted). The condition is dropped with prob cond_drop_prob in
        training mode only."""
        self._check_images(x)
        b = x.shape[0]
        if t is None:
            t = self.timestep_sampler(b, generator=generator, device=x.device)
        t = t.to(x.device)
        if noise is None:
            noise = randn(x.shape, generator, x.device)
        drop = None
        if self.training and self.config.cond_drop_prob > 0 and self.condition.conditional:
            gen_device = generator.device if generator is not None else x.device
            drop = (torch.rand(b, generator=generator, device=gen_device) < self.config.cond_drop_prob).to(x.device)
        cond = self.condition(b, y, text, drop, device=x.device)
        z_t = interpolate(x, noise, t)
        pred = self.velocity(z_t, t, cond)
        return F.mse_loss(pred.float(), velocity_target(x, noise).float())

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, text=None, guidance: float = 0.0, steps: int | None = None,
               generator: torch.Generator | None = None, device: torch.device | str | None = None) -> torch.Tensor:
        """n images [n, C, H, W] by Euler integration from t=1 to t=0 (`steps` steps, default
        config.sample_steps). guidance w: v_c + w (v_c - v_u), cond and uncond rows in one batch."""
        return self._sample(n, y, text, guidance, steps, generator, device, cfg_batch=guidance != 0)

    def _sample(self, n, y, text, guidance, steps, generator, device, cfg_batch: bool) -> torch.Tensor:
        device = torch.device(device) if device is not None else self.device
        steps = self.config.sample_steps if steps is None else steps
        batch_size_of(n, y, text)
        if cfg_batch and not self.condition.conditional:
            raise ValueError("guidance needs a conditional model (num_classes > 0 or cond_dim > 0)")
        c = self.config
        noise = randn((n, c.in_channels, c.image_size, c.image_size), generator, device)
        if not cfg_batch:
            cond = self.condition(n, y, text, device=device)
            return euler_sample(lambda z, t: self.velocity(z, t, cond), noise, steps, c.shift)
        # Rows [0, n) conditional, [n, 2n) the learned null: one forward pass per step.
        y2, text2 = repeat_condition(y, text)
        drop = torch.arange(2 * n, device=device) >= n
        cond = self.condition(2 * n, y2, text2, drop, device=device)

        def cfg_velocity(z, t):
            v_c, v_u = self.velocity(torch.cat([z, z]), torch.cat([t, t]), cond).chunk(2)
            return guided(v_c, v_u, guidance)

        return euler_sample(cfg_velocity, noise, steps, c.shift)

    def nll(self, *args, **kwargs):
        raise NotImplementedError(
            "rectified flow has no exact likelihood; a probability-flow ODE estimate (Hutchinson trace) "
            "is not implemented here, so likelihood is reported as n/a for this model"
        )
