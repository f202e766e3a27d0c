"""The flow stack: T autoregressive flow blocks and a standard normal prior (DESIGN.md §2-3).

Blocks run 0..T-1 from data to noise; block T-1 sits next to the prior and is sampled first. In a
deep-shallow (STARFlow) stack it is the deep block and the only one that reads the condition.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import replace
import math
import os

import torch
import torch.nn as nn
from einops import rearrange

from starflow.flow.config import FlowConfig, check_flow_memory
from starflow.data import spaces
from starflow.flow.block import FlowBlock
from starflow.flow.condition import Condition
from starflow.flow.guidance import Guidance
from starflow.flow.input_spline import InputSpline
from starflow.flow.samplers import FlowSampler
from starflow.flow.weights import MAX_SHARD_BYTES, load_weights, save_weights
from starflow.io.hub import CONFIG_NAME, PretrainedMixin, atomic_write_bytes, read_config
from starflow.flow.sampling import SamplerOptions, SamplingStats, invert_block
from starflow.flow.selective_jacobi import PLAN_SAMPLERS, block_options, load_calibration, resolve_plan, save_calibration

LOG_2PI = math.log(2 * math.pi)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float64 else t.float()


def _zero_padded(states: torch.Tensor, mask: torch.Tensor | None, length: int) -> torch.Tensor:
    """Text states with padded rows zeroed, cut or zero-padded to ``length`` tokens (no mask: every token
    is attended, as the released STARFlow model was trained)."""
    if mask is not None:
        states = states * mask.to(states.device, states.dtype)[..., None]
    B, L, D = states.shape
    if L >= length:
        return states[:, :length]
    return torch.cat([states, states.new_zeros(B, length - L, D)], dim=1)


class STARFlow(nn.Module, PretrainedMixin):
    config_class = FlowConfig
    model_type = "starflow"

    def __init__(self, config: FlowConfig):
        super().__init__()
        if torch.get_default_device().type != "meta":  # on meta nothing is allocated (from_pretrained checks)
            check_flow_memory(config)
        self.config = config
        c = config
        layers = c.block_layers()
        blocks = []
        switches = dict(rope=c.positions == "rope", rope_prefix_axis=c.conditional and c.cond_mode == "prefix",
                        start_token=c.start_token, scale=c.scale, soft_clip=c.soft_clip, final_norm=c.final_norm,
                        num_kv_heads=c.num_kv_heads, swiglu=c.mlp == "swiglu", learned_null=c.learned_null,
                        text_positions=c.max_text_tokens if c.text_positions else 0)
        for i in range(c.num_blocks):
            conditional = c.conditional and (c.cond_blocks == "all" or i == c.num_blocks - 1)
            deep = i == c.num_blocks - 1
            blocks.append(FlowBlock(
                c.token_dim, c.num_tokens, (c.deep_width or c.width) if deep else c.width, layers[i], c.head_dim,
                c.mlp_ratio, reverse_order=bool(i % 2) == (c.seq_order == "R2L"), norm=c.norm, qk_norm=c.qk_norm,
                affine=c.affine, num_classes=c.num_classes if conditional else 0,
                cond_dim=c.cond_dim if conditional else 0, cond_mode=c.cond_mode,
                source_prefix=deep and c.source_prefix, **switches))
        self.blocks = nn.ModuleList(blocks)
        self.input_spline = (InputSpline(c.in_channels, c.input_spline_bins, c.input_spline_bound)
                             if c.input_spline_bins else None)  # data -> the first block's input
        # Per-dimension prior variance used when *sampling* (the official TARFlow code keeps a running
        # estimate of E[z^2] here); likelihoods always use the standard normal prior, as they do there.
        self.register_buffer("prior_var", torch.ones(c.num_tokens, c.token_dim))

    def save_pretrained(self, directory: str, dtype: torch.dtype | None = None,
                        max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        """config.json + model.safetensors, or safetensors shards + an index when larger than
        ``max_shard_bytes`` (a 3B model in bf16 is two shards)."""
        os.makedirs(directory, exist_ok=True)
        cfg = {"model_type": self.model_type, **dataclasses.asdict(self.config)}
        atomic_write_bytes(os.path.join(directory, CONFIG_NAME), json.dumps(cfg, indent=2).encode())
        state = self.state_dict()
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_weights(state, directory, max_shard_bytes)
        if getattr(self, "sampling_calibration", None) is not None:  # selective / segment / auto samplers
            save_calibration(self.sampling_calibration, directory)

    @classmethod
    def from_pretrained(cls, directory: str, map_location: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """Load a saved model. It is built on the meta device and the stored tensors are assigned, so a
        multi-billion-parameter model costs no random initialisation and no second copy. Floating weights
        become ``dtype`` (default: float32, whatever the stored dtype); the prior variance stays float32."""
        config = cls.config_from_dict(read_config(directory))
        check_flow_memory(config, bytes_per_param=4.0 if dtype is None else torch.finfo(dtype).bits / 8)
        with torch.device("meta"):
            model = cls(config)
        state = load_weights(directory)
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        wrong = [k for k, v in state.items() if v.shape != own[k].shape]
        if wrong:
            raise ValueError(f"checkpoint {directory} does not match its config: wrong shapes for {wrong[:5]}")

        def cast(k, v):
            if not v.is_floating_point():
                return v
            return v.to(own[k].dtype if dtype is None or k == "prior_var" else dtype)

        model.load_state_dict({k: cast(k, v) for k, v in state.items()}, assign=True)
        model.sampling_calibration = load_calibration(directory)  # None when the folder has none
        return model.to(map_location)

    # ---- shapes ----------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_channels, c.image_size, c.image_size)

    @property
    def dims(self) -> int:
        return math.prod(self.image_shape)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        return rearrange(x, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p)

    def unpatchify(self, t: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        p, side = self.config.patch_size, self.config.image_size // self.config.patch_size
        h, w = grid or (side, side)
        return rearrange(t, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=h, w=w, p1=p, p2=p)

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an image batch; return its token grid (rows, cols)."""
        c = self.config
        sizes = c.image_sizes()
        if x.ndim != 4 or x.shape[1] != c.in_channels or tuple(x.shape[2:]) not in sizes:
            also = f" (or a bucket size {sizes[1:]})" if len(sizes) > 1 else ""
            raise ValueError(f"expected images of shape [B, {', '.join(map(str, self.image_shape))}]{also}, "
                             f"got {list(x.shape)}")
        return x.shape[2] // c.patch_size, x.shape[3] // c.patch_size

    def positions(self, grid: tuple[int, int], device) -> torch.Tensor:
        """Position ids of an h x w token grid inside the model's square position table (row-major)."""
        side = self.config.image_size // self.config.patch_size
        rows = torch.arange(grid[0], device=device)[:, None] * side
        return (rows + torch.arange(grid[1], device=device)[None, :]).flatten()

    # ---- conditions ------------------------------------------------------------------------
    def make_condition(self, batch: int, y=None, text=None, device=None, cond: Condition | None = None) -> Condition | None:
        """Validate a ``Condition`` (or the legacy labels ``y`` / text states ``text``) and put it in the
        form the blocks read. None -> unconditional (null). The drop mask and the source prefix travel on;
        a condition already in this form comes back unchanged."""
        if cond is not None:
            if y is not None or text is not None:
                raise ValueError("give the condition either as cond or as y / text, not both")
            y, text = cond.labels, None if cond.text is None else (cond.text, cond.text_mask)
            made = self._validated(batch, y, text, device)
            if made is None:
                return None
            if cond.drop is not None and (cond.labels is not None or cond.text is not None):
                made = made.with_drop(cond.drop.reshape(-1))
            if cond.source is not None and self.config.source_prefix:
                made = replace(made, source=self.source_tokens(cond.source, batch, device))
            return made
        return self._validated(batch, y, text, device)

    def _validated(self, batch: int, y, text, device) -> Condition | None:
        c = self.config
        if not c.conditional:
            if y is not None or text is not None:
                raise ValueError("this model is unconditional; do not pass class labels or text")
            return None
        if y is not None and not c.num_classes:
            raise ValueError("this model is text-conditional; pass text, not class labels")
        if text is not None and not c.cond_dim:
            raise ValueError("this model is class-conditional; pass class labels, not text")
        if y is not None:
            y = torch.as_tensor(y, device=device).long().reshape(-1)
            if y.numel() == 1 and batch > 1:
                y = y.expand(batch)
            if y.shape[0] != batch:
                raise ValueError(f"got {y.shape[0]} class labels for a batch of {batch}")
            bad = (y < 0) | (y >= c.num_classes)
            if bad.any():
                raise ValueError(f"class index {int(y[bad][0])} out of range [0, {c.num_classes})")
            return Condition(labels=y)
        if text is not None:
            # (states, mask) or (states, mask, pooled); the pooled vector is for the peer systems
            states, mask = (text[0], text[1]) if isinstance(text, tuple) else (text, None)
            if states.ndim != 3 or states.shape[-1] != c.cond_dim or states.shape[0] != batch:
                raise ValueError(f"text states must be [{batch}, L, {c.cond_dim}], got {list(states.shape)}")
            if c.text_padding == "attend":
                return Condition(text=_zero_padded(states.to(device), mask, c.max_text_tokens))
            return Condition(text=states.to(device), text_mask=None if mask is None else mask.to(device).bool())
        return Condition(drop=torch.ones(batch, dtype=torch.bool, device=device))

    def source_tokens(self, source: torch.Tensor, batch: int, device=None) -> torch.Tensor:
        """An edit model's source image [B, C, H, W] in the model's space -> flow tokens [B, L, D] (tokens
        already made pass through)."""
        if isinstance(source, torch.Tensor) and source.ndim == 3 and tuple(source.shape[1:]) == (
                self.config.num_tokens, self.config.token_dim) and source.shape[0] == batch:
            return source.to(device) if device is not None else source
        if not isinstance(source, torch.Tensor) or source.ndim != 4 or tuple(source.shape[1:]) != self.image_shape:
            got = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
            raise ValueError(f"source must be [B, {', '.join(map(str, self.image_shape))}] in the model's space, got {got}")
        if source.shape[0] != batch:
            raise ValueError(f"got {source.shape[0]} source images for a batch of {batch}")
        return self.patchify((source.to(device) if device is not None else source).float())

    # ---- data -> noise -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y=None, text=None, cond: Condition | None = None):
        """Images x [B, C, H, W] -> (noise z of the same shape, log|det dz/dx| per example [B])."""
        return self._to_noise(x, y, text, cond, per_dim=False)

    def _to_noise(self, x: torch.Tensor, y, text, cond: Condition | None, per_dim: bool):
        grid = self.check_input(x)
        pos = self.positions(grid, x.device)
        cond = self.make_condition(x.shape[0], y, text, x.device, cond)
        x = _at_least_fp32(x)
        logdet = x.new_zeros(x.shape if per_dim else x.shape[:1])
        if self.input_spline is not None:
            x, ld = self.input_spline.elementwise(x)
            logdet = logdet + (ld if per_dim else ld.flatten(1).sum(1))
        if per_dim:
            logdet = self.patchify(logdet)
        h = self.patchify(x)
        for block in self.blocks:
            h, block_ld = block(h, cond if block.conditional else None, pos, per_dim=per_dim)
            logdet = logdet + block_ld
        return self.unpatchify(h, grid), self.unpatchify(logdet, grid) if per_dim else logdet

    def nll_map(self, x: torch.Tensor, y=None, text=None, cond: Condition | None = None) -> torch.Tensor:
        """Where the bits go: the NLL of x [B, C, H, W] split over its dimensions (nats, same shape). Each
        dimension gets its prior term and every step's log-scale at its position (and the input spline's
        slope there); the map sums to -log p(x). For 8-bit images, ``spaces.bits_per_dim(map)`` gives bits
        per pixel in the units of bits/dim."""
        z, logdet = self._to_noise(x, y, text, cond, per_dim=True)
        return 0.5 * _at_least_fp32(z).pow(2) + 0.5 * LOG_2PI - logdet

    def log_prob(self, x: torch.Tensor, y=None, text=None, cond: Condition | None = None) -> torch.Tensor:
        """Exact log-density log p(x) in nats, per example."""
        z, logdet = self.forward(x, y, text, cond)
        return -0.5 * _at_least_fp32(z).pow(2).flatten(1).sum(1) - 0.5 * x[0].numel() * LOG_2PI + logdet

    def nll(self, x: torch.Tensor, y=None, text=None, cond: Condition | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats per dimension, per example.

        An input far off the data can make z overflow (each block rescales by exp(-alpha)), and the
        arithmetic then yields inf or NaN: its density is below anything floats represent, so it scores
        +inf, never NaN (a likelihood used as an out-of-distribution score must rank it last)."""
        nll = -self.log_prob(x, y, text, cond) / x[0].numel()
        return torch.where(torch.isnan(nll), torch.inf, nll)

    def loss(self, x: torch.Tensor, y=None, text=None, cond_drop: torch.Tensor | None = None,
             cond: Condition | None = None) -> torch.Tensor:
        """Training loss: mean NLL (nats/dim), with the condition dropped to the null at cond_drop_prob.

        The trainer draws the dropout mask for the whole global batch and hands each data-parallel rank
        its slice on the condition (``cond.drop``; or as ``cond_drop``, [B] bool, True = use the null
        condition); only a direct caller that gives no mask at all gets the draw here. The source prefix
        of an edit model is never dropped."""
        given = cond_drop is not None or (cond is not None and cond.drop is not None)
        cond = self.make_condition(x.shape[0], y, text, x.device, cond)
        if cond_drop is not None and (cond_drop.ndim != 1 or cond_drop.shape[0] != x.shape[0]):
            raise ValueError(f"cond_drop must be a [{x.shape[0]}] bool mask, got shape {list(cond_drop.shape)}")
        if cond is not None and self.training and self.config.cond_drop_prob > 0:
            if not given:
                cond_drop = torch.rand(x.shape[0], device=x.device) < self.config.cond_drop_prob
            cond = cond.with_drop(cond_drop)
        return (-self.log_prob(x, cond=cond) / x[0].numel()).mean()

    # ---- noise -> data -----------------------------------------------------------------------
    @torch.no_grad()
    def inverse(self, z: torch.Tensor, y=None, text=None, guidance: float | Guidance = 0.0, guidance_rule: str = "starflow",
                sampler: str | FlowSampler = "sequential", negative_y=None, negative_text=None, guidance_blocks: str = "conditional",
                plan: list[str] | None = None, tolerance: float | None = None, return_stats: bool = False,
                cond: Condition | None = None, negative: Condition | None = None, **sampler_kwargs):
        """Noise z [B, C, H, W] -> images. With guidance (a weight > 0 and ``guidance_rule``, or one
        ``Guidance``) the conditional blocks are guided
        (``guidance_blocks="deep"``: the deep block only). The unconditional branch reads the learned null,
        or the condition ``negative_y`` / ``negative_text`` when given (e.g. the encoded empty prompt).

        ``sampler`` (a ``FlowSampler``, or its kind with the ``jacobi_*`` options as keywords) names one way for every block, or a per-block plan sampler (selective, segment,
        auto; see starflow.flow.selective_jacobi) resolved from the model's stored calibration; ``plan``
        gives the per-block choices directly. ``tolerance`` (auto and the calibrated plans): use a stored
        plan only if it was calibrated at least this tight. ``return_stats``: also return SamplingStats."""
        if isinstance(sampler, FlowSampler):
            if sampler_kwargs or plan is not None or tolerance is not None:
                raise ValueError("give the sampler either as a FlowSampler or as sampler= / jacobi_* / plan / "
                                 "tolerance, not both")
            sampler_kwargs = sampler.inverse_kwargs()
            sampler, plan, tolerance = (sampler_kwargs.pop("sampler"), sampler_kwargs.pop("plan", None),
                                        sampler_kwargs.pop("tolerance", None))
        grid = self.check_input(z)
        pos = self.positions(grid, z.device)
        guidance = Guidance.of(guidance, guidance_rule)
        if guidance_blocks not in ("conditional", "deep"):
            raise ValueError(f"guidance_blocks must be 'conditional' or 'deep', got {guidance_blocks!r}")
        unknown = set(sampler_kwargs) - {f.name for f in dataclasses.fields(SamplerOptions)}
        if unknown:
            raise ValueError(f"unknown sampling option(s) {sorted(unknown)}; known: temperature, size, "
                             f"{', '.join(f.name for f in dataclasses.fields(SamplerOptions))}")
        opts = SamplerOptions(sampler=sampler, **sampler_kwargs)
        B = z.shape[0]
        T = len(self.blocks)
        if plan is None and sampler in PLAN_SAMPLERS:
            plan, threshold = resolve_plan(sampler, T, getattr(self, "sampling_calibration", None), B, z.device, tolerance)
            if threshold is not None:  # auto runs its plan as it was verified
                opts = dataclasses.replace(opts, jacobi_threshold=threshold)
        if plan is not None and len(plan) != T:
            raise ValueError(f"a plan needs one entry per block ({T}), got {len(plan)}")
        per_block = [opts] * T if plan is None else [block_options(c, opts) for c in plan]
        cond = self.make_condition(B, y, text, z.device, cond)
        if negative_y is not None or negative_text is not None:
            if negative is not None:
                raise ValueError("give the negative condition either as negative or as negative_y / negative_text")
            negative = Condition.from_args(negative_y, negative_text)
        guided = guidance.active and cond is not None
        if guided:
            if negative is not None:
                if cond.source is not None and negative.source is None:  # the source prefix is never dropped
                    negative = replace(negative, source=cond.source)
                negative = self.make_condition(B, device=z.device, cond=negative)
            cond = guidance.pair(cond, negative)
        elif negative is not None:
            raise ValueError("a negative condition only acts with guidance > 0")
        h = self.patchify(_at_least_fp32(z))
        iterations = [[] for _ in range(T)]
        for i, b in enumerate(reversed(range(T))):
            block = self.blocks[b]
            use = cond if block.conditional else None
            if use is not None and guided and guidance_blocks == "deep" and i > 0:
                use = cond.rows(slice(0, B))  # an unguided conditional shallow block reads the positive half
            block_guided = guided and block.conditional and (guidance_blocks == "conditional" or i == 0)
            ctx = block.context(use, 2 * B if block_guided else B, z.device, pos)
            h = invert_block(block, h, ctx, guidance if block_guided else None, per_block[b], iterations[b])
        x = self.unpatchify(h, grid)
        if self.input_spline is not None:
            x = self.input_spline.inverse(x)
        stats = SamplingStats([o.sampler for o in per_block] if plan is None else list(plan), iterations)
        return (x, stats) if return_stats else x

    @torch.no_grad()
    def sample(self, n: int, y=None, text=None, temperature: float = 1.0, generator: torch.Generator | None = None,
               device=None, size: tuple[int, int] | None = None, cond: Condition | None = None,
               **inverse_kwargs) -> torch.Tensor:
        """Draw n samples (model space, e.g. [-1, 1] pixels) of ``size`` (H, W): the square default or an
        aspect-ratio bucket. Extra arguments go to ``inverse``."""
        if n < 1:
            raise ValueError(f"number of samples must be >= 1, got {n}")
        if not (isinstance(temperature, (int, float)) and 0 < temperature < float("inf")):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        c = self.config
        size = tuple(size) if size is not None else (c.image_size, c.image_size)
        if size not in c.image_sizes():
            raise ValueError(f"size {list(size)} is not one of the model's sizes {c.image_sizes()}")
        device = device or self.prior_var.device
        grid = (size[0] // c.patch_size, size[1] // c.patch_size)
        pos = self.positions(grid, device)
        z = torch.randn((n, pos.shape[0], c.token_dim), generator=generator, device=device)
        z = z * temperature * self.prior_var[pos].sqrt()
        return self.inverse(self.unpatchify(z, grid), y, text, cond=cond, **inverse_kwargs)

    # ---- pixel likelihood ----------------------------------------------------------------------
    def bits_per_dim(self, images: torch.Tensor, y=None, generator: torch.Generator | None = None,
                     cond: Condition | None = None) -> torch.Tensor:
        """Bits/dim of 8-bit images [B, C, H, W] (uint8) under uniform dequantisation, per example.

        u = (pixel + U[0,1)) / 256, y = 2u - 1; bpd = NLL_y / (D ln 2) + 7 (DESIGN.md §2).
        """
        if images.dtype != torch.uint8:
            raise ValueError(f"bits_per_dim takes uint8 images, got {images.dtype}")
        x = spaces.dequantize(images, generator)
        return spaces.bits_per_dim(self.nll(x.to(self.prior_var.device), y, cond=cond))
