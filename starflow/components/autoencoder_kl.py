"""diffusers' ``AutoencoderKL`` architecture in plain torch, so that sampling from a latent model does not
import diffusers (its import alone costs ~4 s of CPU, more than twice ``import torch``: it pulls in
torch._dynamo, scipy and transformers' model code).

``AutoencoderKL.from_pretrained`` reads a diffusers AutoencoderKL directory (``config.json`` +
``diffusion_pytorch_model.safetensors``) into the same module tree under the same parameter names, so the
state dicts are interchangeable and ``save_pretrained`` writes a directory diffusers reads. It covers the
classic SD-VAE layout (``DownEncoderBlock2D``/``UpDecoderBlock2D``, SiLU, group norm, an optional
single-head mid-block attention, the quant convs); ``supports(config)`` says whether a config is in that
set, and ``starflow.components.autoencoder`` falls back to diffusers for anything else and for training.
``tests/test_autoencoder_kl.py`` checks encode and decode against diffusers on the same weights.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from starflow.io.hub import atomic_write_bytes

# diffusers 0.42's AutoencoderKL.__init__ defaults: a config.json that omits a key means this value, and the
# config dict must match diffusers' own so that the encoder fingerprint is the same under both backends.
DEFAULTS = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": 0.18215,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}
EPS = 1e-6  # every group norm of the SD-VAE layout


def supports(config: dict) -> bool:
    """True when ``config`` (a diffusers AutoencoderKL config.json) is a layout this module builds exactly."""
    cfg = {**DEFAULTS, **config}
    return (config.get("_class_name") == "AutoencoderKL" and cfg["act_fn"] == "silu"
            and set(cfg["down_block_types"]) == {"DownEncoderBlock2D"}
            and set(cfg["up_block_types"]) == {"UpDecoderBlock2D"}
            and len(cfg["block_out_channels"]) == len(cfg["down_block_types"]) == len(cfg["up_block_types"])
            and not (set(config) - set(DEFAULTS) - {"_class_name", "_diffusers_version", "_name_or_path"}))


class Config(dict):
    """The config dict, readable as attributes as well (``cfg.block_out_channels``), like diffusers'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=EPS)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=EPS)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.conv_shortcut(x) if self.conv_shortcut is not None else x) + h


class Attention(nn.Module):
    """One-head self-attention over the pixels of the lowest resolution, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, channels, eps=EPS)
        self.to_q, self.to_k, self.to_v = (nn.Linear(channels, channels) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.group_norm(x).flatten(2).transpose(1, 2)                     # [B, HW, C]
        q, k, v = (f(t).unsqueeze(1) for f in (self.to_q, self.to_k, self.to_v))
        a = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        return x + self.to_out[0](a).transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([Attention(channels, groups) if attention else None])

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Resample(nn.Module):
    """Stride-2 convolution (down: zero pad right and bottom by one first) or nearest ×2 then a convolution."""

    def __init__(self, channels: int, down: bool):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(channels, channels, 3, stride=2 if down else 1, padding=0 if down else 1)

    def forward(self, x):
        if self.down:
            return self.conv(F.pad(x, (0, 1, 0, 1)))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Stage(nn.Module):
    """Resnet blocks at one resolution, then an optional resampler (diffusers' Down/UpDecoderBlock2D)."""

    def __init__(self, cin: int, cout: int, layers: int, groups: int, resample: str | None):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(cin if i == 0 else cout, cout, groups) for i in range(layers)])
        if resample == "down":
            self.downsamplers = nn.ModuleList([Resample(cout, down=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Resample(cout, down=False)])

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for name in ("downsamplers", "upsamplers"):  # diffusers' names, kept for its state dicts
            if hasattr(self, name):
                x = getattr(self, name)[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, "down" if i < n - 1 else None) for i in range(n)])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(self.mid_block(x))))


class Decoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            Stage(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, g, "up" if i < n - 1 else None) for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """Same forward maths, parameter names and ``encode(x).latent_dist`` / ``decode(z).sample`` results as
    ``diffusers.AutoencoderKL`` for the layouts ``supports`` accepts (no tiling, slicing or checkpointing)."""

    def __init__(self, config: dict):
        super().__init__()
        if not supports(config):
            raise ValueError(f"AutoencoderKL layout not covered by starflow's own implementation: {config}")
        self.config = Config({**DEFAULTS, **config})
        c = self.config.latent_channels
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if self.config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if self.config.use_post_quant_conv else None

    def encode(self, x: torch.Tensor) -> SimpleNamespace:
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return SimpleNamespace(latent_dist=SimpleNamespace(mean=mean, std=std))

    def decode(self, z: torch.Tensor) -> SimpleNamespace:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return SimpleNamespace(sample=self.decoder(z))

    # ---- the two config methods ``Autoencoder.save_pretrained`` calls on a diffusers model -------------
    def register_to_config(self, **kwargs) -> None:
        self.config.update(kwargs)

    def save_config(self, directory: str) -> None:
        cfg = {"_class_name": "AutoencoderKL", **{k: v for k, v in self.config.items() if k != "_name_or_path"}}
        atomic_write_bytes(os.path.join(directory, "config.json"), json.dumps(cfg, indent=2, sort_keys=True).encode())

    @classmethod
    def from_pretrained(cls, directory: str, config: dict, weights: str, dtype: torch.dtype = torch.float32):
        """Build from ``config`` (the directory's config.json) and load ``weights`` (safetensors) strictly."""
        from safetensors.torch import load_file

        with torch.device("meta"):
            model = cls(config)
        state = load_file(weights)
        try:
            model.load_state_dict(state, strict=True, assign=True)
        except RuntimeError as e:
            raise ValueError(f"weights in {directory} do not match its config.json: {e}") from e
        return model.to(dtype).eval()
