"""Rectified flow as in SD3 (Esser et al. 2024, arXiv 2403.03206).

Time convention (used by every peer in this package): t = 0 is DATA, t = 1 is NOISE.

    z_t = (1 - t) * x0 + t * eps,      eps ~ N(0, I)
    v   = dz_t/dt = eps - x0           (the network's regression target)

Training draws t from a timestep sampler (logit-normal, "mode", cosmap or uniform; optionally
resolution-shifted) and minimises ||v_theta(z_t, t, c) - (eps - x0)||^2. Sampling integrates the
ODE dz/dt = v from t = 1 (pure noise) down to t = 0 with Euler steps, by default on SD3's grid
(schedules.py), optionally by diffusers' FlowMatchEulerDiscreteScheduler itself.

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

from starflow.flow.samplers import EULER_SAMPLERS, EulerSampler, check_shift
from starflow.io.hub import PretrainedMixin
from starflow.peers.conditioning import Condition, ConditionEncoder, condition_args, repeat_condition  # noqa: F401  (re-exported)
from starflow.peers.mmdit import MMDiT
from starflow.peers.schedules import (SCHEDULES, check_sigmas, dynamic_shift_mu, make_diffusers_scheduler,
                                     schedule_sigmas, uniform_sigmas)
from starflow.schema import check_model_memory, check_noise_std, check_types, transformer_params

SAMPLERS = EULER_SAMPLERS  # Euler loop: starflow's own, or diffusers' scheduler
NULL_CONDITIONS = ("learned", "negative")
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
                 steps: int, shift: float = 1.0, sigmas: torch.Tensor | None = None) -> torch.Tensor:
    """Integrate dz/dt = velocity(z, t) from t = 1 (noise) to t = 0 (data) with Euler steps.
    The grid is `sigmas` when given (N + 1 decreasing values, e.g. `schedules.sd3_sigmas` or
    diffusers' scheduler.sigmas; `steps` and `shift` are then unused), else the shifted uniform
    grid with `steps` steps. velocity gets z [B, ...] and t [B]. State kept in float32 so
    low-precision velocities do not accumulate rounding over many steps."""
    if sigmas is None:
        ts = uniform_sigmas(steps, shift, device=noise.device)
    else:
        ts = check_sigmas(sigmas).to(noise.device)
    z = noise.float()
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = velocity(z, t.expand(z.shape[0]))
        z = z + (t_next - t) * v.float()
    return z


def diffusers_euler_sample(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor,
                           steps: int, shift: float = 1.0, mu: float | None = None) -> torch.Tensor:
    """The same integration done by diffusers' FlowMatchEulerDiscreteScheduler (`step`), with its
    grid for this shift (or dynamic shifting with mu). velocity gets t = sigma in [0, 1]."""
    scheduler = make_diffusers_scheduler(shift, dynamic=mu is not None)
    scheduler.set_timesteps(steps, mu=mu)
    z = noise.float()
    for i, timestep in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[i].to(noise.device)
        v = velocity(z, sigma.expand(z.shape[0]))
        z = scheduler.step(v.float(), timestep, z).prev_sample
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
    cond_drop_prob: float = 0.1  # condition -> learned null in training (enables CFG); the trainer draws the mask
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
    sample_schedule: str = "sd3"  # sampling grid: "sd3" (the reference) or "uniform" (starflow's earlier one)
    dynamic_shift: bool = False  # sampling: exponential time shift, mu from the image token count
    null_condition: str = "learned"  # CFG's unconditional branch: "learned" null or a caller's "negative"
    # Network options that make MM-DiT the one SD3 defines (defaults = starflow's own network).
    qk_norm: bool = True
    pos_embed: str = "centres"  # "centres" or "sd3" (SD3's table, saved with the model)
    pos_embed_max_size: int = 0  # sd3 table: side of the table the grid is cropped from (0 = grid)
    pos_embed_base_size: int = 0  # sd3 table: grid the positions are scaled to (0 = grid)
    dual_attention_layers: tuple = ()  # blocks with SD3.5-medium's extra image-only attention
    noise_std: float | None = None  # Gaussian noise on the training data (see schema.check_noise_std)

    def __post_init__(self):
        check_types(self)
        check_noise_std(self)
        self.dual_attention_layers = tuple(int(i) for i in self.dual_attention_layers)
        if self.sample_schedule not in SCHEDULES:
            raise ValueError(f"unknown sample_schedule {self.sample_schedule!r}; choose one of {SCHEDULES}")
        if self.null_condition not in NULL_CONDITIONS:
            raise ValueError(f"unknown null_condition {self.null_condition!r}; choose one of {NULL_CONDITIONS}")
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
                         config.heads, config.mlp_ratio, qk_norm=config.qk_norm, pos_embed=config.pos_embed,
                         pos_embed_max_size=config.pos_embed_max_size,
                         pos_embed_base_size=config.pos_embed_base_size,
                         dual_attention_layers=config.dual_attention_layers)
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
             t: torch.Tensor | None = None, generator: torch.Generator | None = None, negative=None,
             cond=None) -> torch.Tensor:
        """Mean squared velocity error. `noise` / `t` may be passed to make the loss deterministic
        (t is then used as given, unshifted). Condition dropout is already drawn: the rows of
        `cond.drop` (the trainer's mask, at cond_drop_prob for the global batch) read the learned null,
        or `negative` (a text triple, e.g. the encoded empty prompt) when given; the loss draws none."""
        self._check_images(x)
        given_drop = None if cond is None else cond.drop
        y, text, negative = condition_args(y, text, negative, cond)
        b = x.shape[0]
        if t is None:
            t = self.timestep_sampler(b, generator=generator, device=x.device)
        t = t.to(x.device)
        if noise is None:
            noise = randn(x.shape, generator, x.device)
        # the dropout mask comes with the condition (the trainer draws it for the global batch)
        drop = None if given_drop is None else given_drop.to(device=x.device, dtype=torch.bool)
        cond = self.condition.dropped(b, y, text, drop, negative, device=x.device)
        z_t = interpolate(x, noise, t)
        pred = self.velocity(z_t, t, cond)
        return F.mse_loss(pred.float(), velocity_target(x, noise).float())

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, text=None, guidance: float = 0.0, steps: int | None = None,
               generator: torch.Generator | None = None, device: torch.device | str | None = None, *,
               negative=None, schedule: str | None = None, sigmas: torch.Tensor | None = None,
               mu: float | None = None, sampler: str | EulerSampler = "euler", cond=None,
               shift: float | None = None) -> torch.Tensor:
        """n images [n, C, H, W] by Euler integration from t=1 to t=0 (`steps` steps, default
        config.sample_steps). guidance w: v_c + w (v_c - v_u), cond and uncond rows in one batch;
        the unconditional rows use `negative` (a text triple, batch n or 1, e.g. the encoded empty
        prompt) when given, else the learned null.

        Grid: `sigmas` if given, else `schedule` (default config.sample_schedule) with the static
        `shift` (default config.shift), or dynamic shifting with `mu` (default: from the token count if
        config.dynamic_shift and no `shift` is given). sampler="diffusers" hands the loop to diffusers'
        FlowMatchEulerDiscreteScheduler (its own sd3 grid, same shift / mu). An ``EulerSampler`` gives
        steps, schedule, shift, mu and the loop as one value."""
        y, text, negative = condition_args(y, text, negative, cond)
        if isinstance(sampler, EulerSampler):
            if any(v is not None for v in (steps, schedule, mu, shift)):
                raise ValueError("give steps / schedule / shift / mu either in the EulerSampler or as keywords, "
                                 "not both")
            steps, schedule, mu, shift = sampler.steps, sampler.schedule, sampler.mu, sampler.shift
            sampler = sampler.backend
        return self._sample(n, y, text, guidance, steps, generator, device, cfg_batch=guidance != 0,
                            negative=negative, schedule=schedule, sigmas=sigmas, mu=mu, sampler=sampler, shift=shift)

    def sampling_mu(self, mu: float | None = None) -> float | None:
        """mu of dynamic shifting: the caller's, else from the token count when config.dynamic_shift."""
        if mu is None and self.config.dynamic_shift:
            return dynamic_shift_mu(self.net.grid ** 2)
        return mu

    def _sample(self, n, y, text, guidance, steps, generator, device, cfg_batch: bool, *, negative=None,
                schedule=None, sigmas=None, mu=None, sampler="euler", shift=None) -> torch.Tensor:
        device = torch.device(device) if device is not None else self.device
        c = self.config
        steps = c.sample_steps if steps is None else steps
        if shift is not None:  # a caller's static shift replaces the config's, and its dynamic shifting
            if sigmas is not None or mu is not None:
                raise ValueError("a shift shapes the schedule's grid: pass neither sigmas nor mu with it")
            check_shift(shift)
        batch_size_of(n, y, text)
        if cfg_batch and not self.condition.conditional:
            raise ValueError("guidance needs a conditional model (num_classes > 0 or cond_dim > 0)")
        if cfg_batch and negative is None and c.null_condition == "negative":
            raise ValueError("this model has no learned null: guidance needs `negative` "
                             "(e.g. the encoded empty prompt)")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
        mu = self.sampling_mu(mu) if shift is None else None
        shift = c.shift if shift is None else shift
        noise = randn((n, c.in_channels, c.image_size, c.image_size), generator, device)
        if not cfg_batch:
            cond = self.condition(n, y, text, device=device)
            velocity = lambda z, t: self.velocity(z, t, cond)  # noqa: E731
        else:  # rows [0, n) conditional, [n, 2n) unconditional: one forward pass per step
            cond = self.condition.guidance_pair(n, y, text, negative, device=device)

            def velocity(z, t):
                v_c, v_u = self.velocity(torch.cat([z, z]), torch.cat([t, t]), cond).chunk(2)
                return guided(v_c, v_u, guidance)

        if sampler == "diffusers":
            if sigmas is not None or schedule not in (None, "sd3"):
                raise ValueError("the diffusers sampler uses its own (sd3) grid: pass neither sigmas nor a schedule")
            return diffusers_euler_sample(velocity, noise, steps, shift, mu)
        if sigmas is None:
            sigmas = schedule_sigmas(schedule or c.sample_schedule, steps, shift, mu, device=device)
        return euler_sample(velocity, noise, steps, sigmas=sigmas)

    def nll(self, *args, **kwargs):
        raise NotImplementedError(
            "rectified flow has no exact likelihood; a probability-flow ODE estimate (Hutchinson trace) "
            "is not implemented here, so likelihood is reported as n/a for this model"
        )
