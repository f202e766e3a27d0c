"""FlowAR (Ren et al. 2025, arXiv 2412.15205): scale-wise autoregression + a flow-matching head per scale.

The image (or latent) F is average-pooled into a coarse-to-fine pyramid F^1, ..., F^K (sides
`scales`, the last equal to the full side). Two networks:

1. A block-causal AR transformer over

       [condition tokens ; start tokens (scale 1) ; up(F^1) (scale 2) ; ... ; up(F^{K-1}) (scale K)]

   causal ACROSS scales and bidirectional WITHIN a scale. Its outputs at the positions of scale i are
   the semantics s^i [B, side_i^2, width]: everything the model knows about scale i given the
   condition and the coarser scales. At inference a KV cache keeps the prefix, so each new scale
   costs only its own tokens.

2. A small flow-matching transformer (weights shared across scales, told the scale by an
   embedding) that generates F^i from noise, conditioned on s^i through Spatial-adaLN: the adaLN
   shift / scale / gate are computed PER POSITION from s^i (plus the timestep), not from one global
   vector, so every spatial location gets its own modulation.

Time convention as in rectified_flow.py: z_t = (1 - t) F^i + t eps, t = 0 data, t = 1 noise, target
eps - F^i. Training is teacher-forced (the AR input is the TRUE coarser scale); sampling feeds back
its own output: scale 1 from the condition, upsample, feed back, repeat, with a few Euler steps per
scale. Guidance (same convention as the other peers, w = 0 is plain conditional) is ramped over
scales: w_i = w (i + 1) / K, weak where the layout is decided, full at the finest scale.

Against the official FlowAR code (models/flowar.py, flowmodel.py, flowloss.py, sampler.py of the
authors' repository; read, not copied). tests/test_flowar_reference.py checks each line marked
"same" or "option" and pins each "differs" so a change to it is noticed.

Same:
- pyramid: targets are area (average) downsamplings of the latent, sides doubling to the full side;
- AR attention: block-causal over scales, bidirectional within a scale; KV cache at sampling;
- path and target: z_t = (1 - t) x + t eps, v = eps - x, t = 1 noise; loss = MSE on v;
- one flow head shared by every scale, conditioned per position on the AR output (Spatial-adaLN:
  shift / scale / gate from semantics + timestep), fresh N(0, I) noise for every scale;
- CFG on velocity with a learned null class (official lambda = our w + 1), 10% label dropout,
  guidance ramped over scales.
Options (off by default, `FlowARConfig`):
- sample_schedule="flowar": the official per-scale grid (schedules.flowar_sigmas);
- guidance_ramp="flowar": lambda_i = 1 + (lambda - 1) i / (K - 1) (no guidance at scale 1);
- guidance_max_t: guidance only while t <= this ("guidance" 0.9 / 0.7 in the official evaluation);
- upsample="bicubic-area": the next scale's AR input as the official code builds it (bicubic to the
  full side, then area-downsampled), instead of nearest upsampling;
- timestep_sampler="uniform" and scale_loss_weights = side_i^2 reproduce the official training
  (t ~ U(0, 1), one per image and scale; per-scale losses weighted by token count, up to a
  constant factor).
Differs:
- condition: prefix tokens ([pooled; class/text tokens]) plus a learned start token for scale 1
  (official: the class embedding IS the scale-1 token, and it also drives adaLN in every AR block);
- AR trunk: one LayerNorm/GELU pre-norm stack with fixed sin-cos positions on a shared extent and a
  learned scale embedding (official: MAE-style encoder + decoder stacks, RMSNorm, SwiGLU, 2-D RoPE
  rescaled to a shared extent, learned absolute positions, class adaLN);
- head: LayerNorm, GELU MLP, adaLN-Zero, continuous t (official: RMSNorm, SwiGLU, RoPE, only the
  output layer zero-initialised, t quantised to int(1000 t); L/H heads add a cross-attention);
- defaults: logit-normal t and equal per-scale loss weights (official: uniform t, token-count weights).
Official checkpoints (FlowAR-S/L/H on the MAR KL-16 tokenizer) are NOT importable: their key layout
belongs to the different trunk and head above (encoder_blocks.*.ada_lin, SwiGLU fc1_g/fc1_x, RoPE,
flownet.res_blocks.*.crossattn), which no renaming maps onto this network.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from starflow.flow.samplers import EulerSampler
from starflow.io.hub import PretrainedMixin
from starflow.nn.attention import KVCache
from starflow.nn.embeddings import sincos_pos_embed
from starflow.peers.conditioning import Condition, ConditionEncoder, condition_args
from starflow.peers.flowar_layers import ARBlock, FlowHead, block_causal_mask  # noqa: F401  (re-exported)
from starflow.peers.rectified_flow import (TimestepSampler, batch_size_of, euler_sample, guided, interpolate, randn,
                                           velocity_target)
from starflow.peers.schedules import flowar_sigmas, uniform_sigmas
from starflow.schema import check_model_memory, check_noise_std, check_types, transformer_params

GUIDANCE_RAMPS = ("starflow", "flowar")

# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass
class FlowARConfig:
    in_channels: int = 4
    image_size: int = 8
    scales: tuple[int, ...] = (1, 2, 4, 8)  # sides of the pyramid, coarse -> fine, last = image_size
    num_classes: int = 0
    cond_dim: int = 0
    pooled_dim: int = 0
    cond_drop_prob: float = 0.1  # condition -> learned null during training (the trainer draws the mask)
    num_class_tokens: int = 1
    # Defaults sized to match RectifiedFlowConfig's defaults within ~2% of parameters
    # (13.4M vs 13.6M for 4x8x8 latents), so a default comparison is at equal size.
    width: int = 256  # AR transformer
    depth: int = 12
    heads: int = 4
    head_width: int = 256  # flow-matching head (weights shared across scales)
    head_depth: int = 3
    head_heads: int = 4
    mlp_ratio: float = 4.0
    scale_loss_weights: tuple[float, ...] | None = None  # None = every scale weighted equally
    timestep_sampler: str = "logit-normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    sample_steps: int = 10  # Euler steps per scale
    # Sampling choices of the official FlowAR code, off by default (see the module docstring).
    sample_schedule: str = "uniform"  # per-scale grid: "uniform" or "flowar" (two-piece, 1..0.3 | 0.25..0)
    guidance_ramp: str = "starflow"  # scale i of K: "starflow" w (i+1)/K, or "flowar" w i/(K-1)
    guidance_max_t: float = 1.0  # guide only while t <= this (official: 0.9, FlowAR-H 0.7)
    upsample: str = "nearest"  # next scale's AR input: "nearest" or "bicubic-area" (official)
    noise_std: float | None = None  # Gaussian noise on the training data (see schema.check_noise_std)

    def __post_init__(self):
        check_types(self)
        check_noise_std(self)
        if self.sample_schedule not in ("uniform", "flowar"):
            raise ValueError(f"sample_schedule must be 'uniform' or 'flowar', got {self.sample_schedule!r}")
        if self.guidance_ramp not in GUIDANCE_RAMPS:
            raise ValueError(f"guidance_ramp must be one of {GUIDANCE_RAMPS}, got {self.guidance_ramp!r}")
        if self.upsample not in ("nearest", "bicubic-area"):
            raise ValueError(f"upsample must be 'nearest' or 'bicubic-area', got {self.upsample!r}")
        if not 0.0 < self.guidance_max_t <= 1.0:
            raise ValueError(f"guidance_max_t must be in (0, 1], got {self.guidance_max_t}")
        self.scales = tuple(int(s) for s in self.scales)  # JSON gives lists back
        if self.scale_loss_weights is not None:
            self.scale_loss_weights = tuple(float(w) for w in self.scale_loss_weights)
        if not self.scales or list(self.scales) != sorted(set(self.scales)) or self.scales[0] < 1:
            raise ValueError(f"scales must be strictly increasing positive sides, got {self.scales}")
        if self.scales[-1] != self.image_size:
            raise ValueError(f"the last scale must equal image_size {self.image_size}, got scales {self.scales}")
        bad = [s for s in self.scales if self.image_size % s]
        if bad:
            raise ValueError(f"every scale must divide image_size {self.image_size} (average pooling); bad: {bad}")
        if self.scale_loss_weights is not None and (
                len(self.scale_loss_weights) != len(self.scales) or min(self.scale_loss_weights) < 0
                or sum(self.scale_loss_weights) <= 0):
            raise ValueError(f"scale_loss_weights must be {len(self.scales)} non-negative numbers with a positive "
                             f"sum, got {self.scale_loss_weights}")
        if not 0.0 <= self.cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {self.cond_drop_prob}")
        for name in ("in_channels", "width", "depth", "heads", "head_width", "head_depth", "head_heads",
                     "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.width % self.heads or self.head_width % self.head_heads:
            raise ValueError("width must be divisible by heads and head_width by head_heads")
        if self.width % 4 or self.head_width % 4:
            raise ValueError("width and head_width must be divisible by 4 (2-D sin-cos positions)")
        self.timesteps()
        tokens = sum(s * s for s in self.scales)
        check_model_memory(transformer_params(self.width, self.depth, self.mlp_ratio)
                           + transformer_params(self.head_width, self.head_depth, self.mlp_ratio)
                           + (self.num_classes + self.cond_dim + self.pooled_dim + tokens) * self.width,
                           self.depth * tokens * (self.width * (4 + self.mlp_ratio) + tokens * self.heads))

    def timesteps(self) -> TimestepSampler:
        return TimestepSampler(self.timestep_sampler, self.logit_mean, self.logit_std, self.mode_scale)

    def guidance_at(self, w: float, i: int) -> float:
        """Guidance weight of scale i (0-based) for overall weight w."""
        k = len(self.scales)
        if self.guidance_ramp == "flowar":
            return w * i / (k - 1) if k > 1 else w
        return w * (i + 1) / k

    def sigmas(self, steps: int, device=None) -> torch.Tensor:
        if self.sample_schedule == "flowar":
            return flowar_sigmas(steps, device)
        return uniform_sigmas(steps, device=device)


class FlowAR(nn.Module, PretrainedMixin):
    config_class = FlowARConfig
    model_type = "flowar"

    def __init__(self, config: FlowARConfig):
        super().__init__()
        self.config = config
        c = config
        self.condition = ConditionEncoder(c.width, c.num_classes, c.cond_dim, c.pooled_dim, c.num_class_tokens)
        self.start_token = nn.Parameter(torch.randn(c.width) * 0.02)  # AR input of the first scale
        self.input_proj = nn.Linear(c.in_channels, c.width)  # AR input of later scales: up(F^{i-1})
        self.scale_embed = nn.Parameter(torch.randn(len(c.scales), c.width) * 0.02)
        for i, s in enumerate(c.scales):
            self.register_buffer(f"pos_{i}", sincos_pos_embed(s, c.width, extent=c.image_size), persistent=False)
        self.blocks = nn.ModuleList([ARBlock(c.width, c.heads, c.mlp_ratio) for _ in range(c.depth)])
        self.norm = nn.LayerNorm(c.width)
        for m in self.blocks.modules():  # nanoGPT init for the AR trunk
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.head = FlowHead(c.in_channels, c.width, c.head_width, c.head_depth, c.head_heads, c.mlp_ratio,
                             c.scales, c.image_size)
        self.timestep_sampler = config.timesteps()
        w = c.scale_loss_weights or (1.0,) * len(c.scales)
        self.register_buffer("loss_weights", torch.tensor(w) / sum(w), persistent=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ---- scales ----------------------------------------------------------------------------

    def pyramid(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Average-pool x to every scale: [B, C, s, s] for s in scales (the last is x itself)."""
        return [F.avg_pool2d(x, self.config.image_size // s) if s != self.config.image_size else x
                for s in self.config.scales]

    def upsample(self, x: torch.Tensor, scale: int) -> torch.Tensor:
        side = (self.config.scales[scale],) * 2
        if self.config.upsample == "bicubic-area":  # the official code: bicubic to full size, area down
            full = F.interpolate(x, size=(self.config.image_size,) * 2, mode="bicubic")
            return F.interpolate(full, size=side, mode="area")
        # Nearest: average-pooling the result gives x back exactly, so the AR input carries the
        # coarse scale's information unchanged.
        return F.interpolate(x, size=side, mode="nearest")

    # ---- AR transformer --------------------------------------------------------------------

    def prefix(self, cond: Condition) -> tuple[torch.Tensor, torch.Tensor]:
        """Condition tokens for the AR sequence: [pooled vector ; condition tokens] and their key
        mask. The pooled token is always real, so no query ever sees an all-masked row."""
        tokens = torch.cat([cond.pooled[:, None, :].to(cond.tokens.dtype), cond.tokens], dim=1)
        mask = torch.cat([torch.ones_like(cond.mask[:, :1]), cond.mask], dim=1)
        return tokens, mask

    def embed_scale(self, i: int, prev_up: torch.Tensor | None, batch: int) -> torch.Tensor:
        """AR input tokens of scale i: the start token (i = 0) or the upsampled scale i-1."""
        pos = getattr(self, f"pos_{i}") + self.scale_embed[i]
        if i == 0:
            return self.start_token + pos.expand(batch, -1, -1)
        return self.input_proj(rearrange(prev_up, "b c h w -> b (h w) c")) + pos

    def attention_mask(self, prefix_mask: torch.Tensor) -> torch.Tensor:
        """[B, 1, L, L] bool for the whole AR sequence: block-causal over [prefix; scale 1; ...; scale K],
        and no query reads a padded condition token."""
        sizes = [prefix_mask.shape[1]] + [s * s for s in self.config.scales]
        causal = block_causal_mask(sizes, prefix_mask.device)
        keys = torch.cat([prefix_mask, prefix_mask.new_ones(prefix_mask.shape[0], sum(sizes[1:]))], dim=1)
        return causal[None, None] & keys[:, None, None, :]

    def run_ar(self, tokens: torch.Tensor, mask: torch.Tensor, cache: list[KVCache] | None = None,
               start: int = 0) -> torch.Tensor:
        for j, block in enumerate(self.blocks):
            tokens = block(tokens, mask, None if cache is None else cache[j], start)
        return self.norm(tokens)

    def semantics(self, cond: Condition, prev_ups: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """One full (uncached) pass. prev_ups[i] = up(F^{i-1}) for i >= 1 (prev_ups[0] is ignored).
        Returns s^i [B, side_i^2, width] for every scale."""
        prefix, prefix_mask = self.prefix(cond)
        b = prefix.shape[0]
        seq = [prefix] + [self.embed_scale(i, prev_ups[i], b) for i in range(len(self.config.scales))]
        h = self.run_ar(torch.cat(seq, dim=1), self.attention_mask(prefix_mask))
        return list(h[:, prefix.shape[1]:].split([s * s for s in self.config.scales], dim=1))

    def semantics_step(self, i: int, cond_prefix, prev_up: torch.Tensor | None, cache: list[KVCache]) -> torch.Tensor:
        """Cached pass for scale i only (scale 0 also pushes the prefix). Returns s^i."""
        prefix, prefix_mask = cond_prefix
        b = prefix.shape[0]
        chunk = self.embed_scale(i, prev_up, b)
        if i == 0:
            chunk = torch.cat([prefix, chunk], dim=1)
        start = cache[0].length
        end = start + chunk.shape[1]
        mask = self.attention_mask(prefix_mask)[:, :, start:end, :end]
        side = self.config.scales[i]
        return self.run_ar(chunk, mask, cache, start)[:, -side * side:]

    def new_cache(self, cond_prefix) -> list[KVCache]:
        """One KV cache per AR block, long enough for the prefix and every scale."""
        length = cond_prefix[0].shape[1] + sum(s * s for s in self.config.scales)
        return [KVCache(length) for _ in self.blocks]

    def semantics_cached(self, cond: Condition, prev_ups: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
        """Same as `semantics`, scale by scale through the KV cache (what sampling does)."""
        cond_prefix = self.prefix(cond)
        cache = self.new_cache(cond_prefix)
        return [self.semantics_step(i, cond_prefix, prev_ups[i], cache) for i in range(len(self.config.scales))]

    # ---- training --------------------------------------------------------------------------

    def loss(self, x: torch.Tensor, y: torch.Tensor | None = None, text=None, *,
             generator: torch.Generator | None = None, return_per_scale: bool = False, negative=None,
             cond=None):
        """Scale-weighted flow-matching loss, teacher-forced on the true pyramid. Condition dropout is
        already drawn: the rows of `cond.drop` (the trainer's mask, at cond_drop_prob for the global
        batch) read the learned null, or `negative` (a text triple, e.g. the encoded empty prompt) when
        given; the loss draws none."""
        c = self.config
        if x.ndim != 4 or tuple(x.shape[1:]) != (c.in_channels, c.image_size, c.image_size):
            raise ValueError(f"x must be [B, {c.in_channels}, {c.image_size}, {c.image_size}], got {tuple(x.shape)}")
        given_drop = None if cond is None else cond.drop
        y, text, negative = condition_args(y, text, negative, cond)
        b = x.shape[0]
        # the dropout mask comes with the condition (the trainer draws it for the global batch)
        drop = None if given_drop is None else given_drop.to(device=x.device, dtype=torch.bool)
        cond = self.condition.dropped(b, y, text, drop, negative, device=x.device)
        pyr = self.pyramid(x)
        sems = self.semantics(cond, [None] + [self.upsample(pyr[i - 1], i) for i in range(1, len(pyr))])
        per_scale = []
        for i, (target, sem) in enumerate(zip(pyr, sems)):
            t = self.timestep_sampler(b, generator=generator, device=x.device)
            noise = randn(target.shape, generator, x.device)
            pred = self.head(interpolate(target, noise, t), t, sem, i)
            per_scale.append(F.mse_loss(pred.float(), velocity_target(target, noise).float()))
        per_scale = torch.stack(per_scale)
        total = (self.loss_weights * per_scale).sum()
        return (total, per_scale.detach()) if return_per_scale else total

    # ---- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, n: int, y: torch.Tensor | None = None, text=None, guidance: float = 0.0,
               steps: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, *, negative=None, cond=None,
               sampler: EulerSampler | None = None) -> torch.Tensor:
        """n images [n, C, H, W], coarse to fine. steps: Euler steps per scale (an int, or one per
        scale; default config.sample_steps). guidance w is ramped over scales (config.guidance_ramp). The
        unconditional rows use `negative` (a text triple, batch n or 1, e.g. the encoded empty
        prompt) when given, else the learned null."""
        y, text, negative = condition_args(y, text, negative, cond)
        if sampler is not None:
            if not isinstance(sampler, EulerSampler) or (sampler.schedule, sampler.mu, sampler.shift, sampler.backend) != (None, None, None, "euler"):
                raise ValueError(f"FlowAR samples with an EulerSampler that sets steps only, got {sampler!r}")
            if steps is not None:
                raise ValueError("give steps either in the EulerSampler or as a keyword, not both")
            steps = sampler.steps
        return self._sample(n, y, text, guidance, steps, generator, device, cfg_batch=guidance != 0,
                            negative=negative)

    def _sample(self, n, y, text, guidance, steps, generator, device, cfg_batch: bool, *,
                negative=None) -> torch.Tensor:
        c = self.config
        device = torch.device(device) if device is not None else self.device
        k = len(c.scales)
        steps = c.sample_steps if steps is None else steps
        steps = [int(steps)] * k if isinstance(steps, int) else [int(s) for s in steps]
        if len(steps) != k:
            raise ValueError(f"steps must be an int or {k} ints (one per scale), got {len(steps)}")
        batch_size_of(n, y, text)
        if cfg_batch and not self.condition.conditional:
            raise ValueError("guidance needs a conditional model (num_classes > 0 or cond_dim > 0)")
        if cfg_batch:  # rows [0, n) conditional, [n, 2n) unconditional; one AR/head pass for both
            cond = self.condition.guidance_pair(n, y, text, negative, device=device)
        else:
            cond = self.condition(n, y, text, device=device)
        cond_prefix = self.prefix(cond)
        cache = self.new_cache(cond_prefix)
        x = None
        for i, side in enumerate(c.scales):
            prev_up = None
            if i > 0:
                prev_up = self.upsample(x, i)
                prev_up = torch.cat([prev_up, prev_up]) if cfg_batch else prev_up
            sem = self.semantics_step(i, cond_prefix, prev_up, cache)
            w = c.guidance_at(guidance, i)

            def velocity(z, t, sem=sem, i=i, w=w):
                if not cfg_batch:
                    return self.head(z, t, sem, i)
                v_c, v_u = self.head(torch.cat([z, z]), torch.cat([t, t]), sem, i).chunk(2)
                return guided(v_c, v_u, w) if c.guidance_max_t >= 1 or float(t[0]) <= c.guidance_max_t else v_c

            noise = randn((n, c.in_channels, side, side), generator, device)
            x = euler_sample(velocity, noise, steps[i], sigmas=c.sigmas(steps[i], device))
        return x

    def nll(self, *args, **kwargs):
        raise NotImplementedError(
            "FlowAR has no exact likelihood (its per-scale flows are ODE-based and the pyramid is not "
            "invertible); likelihood is reported as n/a for this model"
        )
