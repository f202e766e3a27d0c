"""Import checkpoints written by the official TARFlow code (apple/ml-tarflow, ``transformer_flow.Model``).

Their conventions, mapped onto ours:
* every block reads the class as an embedding *added* to all tokens (``cond_mode="add"``,
  ``cond_blocks="all"``); their unconditional branch uses the mean class embedding, which becomes our
  learned-null row;
* their ``logdets`` are means over dimensions (ours are sums) and their ``var`` buffer scales the prior
  noise at sampling time (our ``prior_var``);
* attention heads are 64 wide unless stated otherwise; the first half of ``proj_out`` is the log-scale.
"""
from __future__ import annotations

import re

import torch

from starflow.flow.config import FlowConfig
from starflow.errors import CheckpointError, ConfigError
from starflow.flow.model import STARFlow
from starflow.io.hub import load_safetensors

# The official Model(...) arguments a conversion cannot guess.
REQUIRED_ARGS = ("in_channels", "img_size", "patch_size", "channels", "num_blocks", "layers_per_block")

_LAYER = re.compile(r"blocks\.(\d+)\.attn_blocks\.(\d+)\.(.*)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(proj_in\.weight|proj_in\.bias|proj_out\.weight|proj_out\.bias|pos_embed|class_embed)$")


def config_from_tarflow(in_channels: int, img_size: int, patch_size: int, channels: int, num_blocks: int,
                        layers_per_block: int, nvp: bool = True, num_classes: int = 0, head_dim: int = 64,
                        expansion: int = 4, **ignored) -> FlowConfig:
    """Our FlowConfig for the official ``Model(...)`` constructor arguments."""
    return FlowConfig(in_channels=in_channels, image_size=img_size, patch_size=patch_size, width=channels,
                      head_dim=head_dim, mlp_ratio=expansion, num_blocks=num_blocks,
                      layers_per_block=layers_per_block, num_classes=num_classes, cond_mode="add",
                      cond_blocks="all", cond_drop_prob=0.0, affine=nvp)


def convert_state_dict(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.endswith("attn_mask"):
            continue  # a constant causal mask; ours is built on the fly
        if key == "var":
            out["prior_var"] = value
        elif m := _LAYER.fullmatch(key):
            out[f"blocks.{m[1]}.layers.{m[2]}.{m[3]}"] = value
        elif m := _BLOCK.fullmatch(key):
            if m[2] == "class_embed":
                table = value.reshape(value.shape[0], -1)
                # Append the null row: the official unconditional embedding is the mean of the classes.
                out[f"blocks.{m[1]}.condition.class_embed"] = torch.cat([table, table.mean(0, keepdim=True)])
            else:
                out[f"blocks.{m[1]}.{m[2]}"] = value
        else:
            raise ValueError(f"unexpected key in TARFlow checkpoint: {prefix}{key}")
    return out


def from_tarflow(checkpoint: str | dict[str, torch.Tensor], config: dict | FlowConfig, prefix: str | None = None) -> STARFlow:
    """Build a STARFlow model from an official TARFlow state dict (a safetensors path or a dict).

    ``config`` is our FlowConfig or the official constructor arguments (``in_channels``, ``img_size``,
    ``patch_size``, ``channels``, ``num_blocks``, ``layers_per_block``, ``nvp``, ``num_classes``).
    ``prefix`` is stripped from keys; by default ``model.`` or ``module.`` is detected.
    """
    if not isinstance(config, FlowConfig):
        if not isinstance(config, dict):
            raise ConfigError(f"the TARFlow config must be a JSON object, got a {type(config).__name__}")
        missing = [k for k in REQUIRED_ARGS if k not in config]
        if missing:
            raise ConfigError(f"the TARFlow config lacks {missing} (needs {', '.join(REQUIRED_ARGS)})")
        config = config_from_tarflow(**config)
    cfg = config
    state = load_safetensors(checkpoint) if isinstance(checkpoint, str) else checkpoint
    if prefix is None:
        prefix = next((p for p in ("model.", "module.") if any(k.startswith(p + "blocks.") for k in state)), "")
    model = STARFlow(cfg)
    converted = convert_state_dict(state, prefix)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (config wants {tuple(own[k].shape)})" for k, v in converted.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"TARFlow checkpoint does not fit the config: {len(wrong)} tensor(s) have the wrong "
                              f"shape, e.g. {wrong[0]}")
    missing, unexpected = model.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"TARFlow checkpoint does not fit the config {cfg}: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model
