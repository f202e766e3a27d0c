"""Import a diffusers ``SD3Transformer2DModel`` (SD3 / SD3.5 MM-DiT) as starflow's RectifiedFlow.

Their layout, mapped onto ours (net = MMDiT, condition = ConditionEncoder):

* ``pos_embed.proj`` is a p x p stride-p conv over [C, H, W]; ours is a linear over patches
  flattened as (p, q, c), so the conv kernel [D, C, p, q] is permuted to [D, p, q, C]. The
  checkpoint's own position table (``pos_embed.pos_embed``, max_size^2 rows) is cropped at its
  centre exactly as SD3 crops it, and stored in our persistent ``pos_embed`` buffer.
* separate ``to_q/to_k/to_v`` (image) and ``add_q/k/v_proj`` (context) become our fused ``qkv``
  (q, k, v stacked along the output axis, heads contiguous).
* ``AdaLayerNormZero`` chunks (shift, scale, gate, shift, scale, gate [, shift2, scale2, gate2])
  are in our order already; ``AdaLayerNormContinuous`` — the last block's context norm and
  ``norm_out`` — emits (scale, shift), so its two halves are swapped into our (shift, scale).
* timestep embedding (cos first, t in [0, 1000]) and the pooled-text MLP match ours layer for
  layer; ``context_embedder`` is our ``text_proj``.
* SD3's unconditional branch is the encoded empty prompt, so the converted model has
  ``null_condition="negative"`` (its learned-null slots are zero placeholders) and no condition
  dropout.

QK-norm: None (SD3-medium) -> qk_norm=False; "rms_norm" (SD3.5) -> True. Dual-attention layers
(SD3.5-medium) map onto MM-DiT's ``dual_attention_layers``. Anything else is refused by name.
"""
from __future__ import annotations

import glob
import json
import os

import torch

from starflow.io.hub import load_safetensors
from starflow.peers.rectified_flow import RectifiedFlow, RectifiedFlowConfig

SD3_SHIFT = 3.0  # the scheduler shift SD3 / SD3.5 ship with
SD3_STEPS = 28  # the reference pipelines' default number of steps


def config_from_diffusers_sd3(config: dict, image_size: int | None = None, shift: float = SD3_SHIFT,
                              dynamic_shift: bool = False) -> RectifiedFlowConfig:
    """Our RectifiedFlowConfig for an ``SD3Transformer2DModel`` config.json. image_size (latent
    side) defaults to the model's sample_size; any size whose grid fits the position table works."""
    cfg = {**dict(sample_size=128, patch_size=2, in_channels=16, num_layers=18, attention_head_dim=64,
                  num_attention_heads=18, joint_attention_dim=4096, caption_projection_dim=1152,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=96, dual_attention_layers=(),
                  qk_norm=None), **config}
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    if cfg["caption_projection_dim"] != width:
        raise ValueError(f"caption_projection_dim {cfg['caption_projection_dim']} != transformer width {width}: "
                         "MM-DiT's condition stream has the image stream's width")
    if (cfg["out_channels"] or cfg["in_channels"]) != cfg["in_channels"]:
        raise ValueError(f"out_channels {cfg['out_channels']} != in_channels {cfg['in_channels']}: the velocity has "
                         "the latent's shape")
    if cfg["qk_norm"] not in (None, "rms_norm"):
        raise ValueError(f"qk_norm={cfg['qk_norm']!r} is not supported (only None and 'rms_norm')")
    patch = cfg["patch_size"]
    return RectifiedFlowConfig(
        in_channels=cfg["in_channels"], image_size=image_size or cfg["sample_size"], patch_size=patch,
        cond_dim=cfg["joint_attention_dim"], pooled_dim=cfg["pooled_projection_dim"], cond_drop_prob=0.0,
        width=width, depth=cfg["num_layers"], heads=cfg["num_attention_heads"], mlp_ratio=4.0, shift=shift,
        sample_steps=SD3_STEPS, sample_schedule="sd3", dynamic_shift=dynamic_shift, null_condition="negative",
        qk_norm=cfg["qk_norm"] == "rms_norm", pos_embed="sd3", pos_embed_max_size=cfg["pos_embed_max_size"] or 0,
        pos_embed_base_size=cfg["sample_size"] // patch,
        dual_attention_layers=tuple(cfg["dual_attention_layers"] or ()),
    )


def read_diffusers_folder(folder: str) -> tuple[dict, dict]:
    """(config, state dict) of a diffusers model folder: config.json + one or more .safetensors."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} has no config.json; is it a diffusers SD3Transformer2DModel folder?")
    with open(path) as f:
        config = json.load(f)
    if config.get("_class_name", "SD3Transformer2DModel") != "SD3Transformer2DModel":
        raise ValueError(f"{folder} holds a {config['_class_name']}, not an SD3Transformer2DModel")
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder} (other formats are not read)")
    state = {}
    for file in files:  # sharded checkpoints: the shards together hold every key once
        state.update(load_safetensors(file))
    return config, state


def scheduler_options(folder: str) -> dict:
    """shift / dynamic shifting from the pipeline's scheduler/ folder next to transformer/, if any."""
    path = os.path.join(os.path.dirname(os.path.abspath(folder)), "scheduler", "scheduler_config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        sched = json.load(f)
    return {"shift": float(sched.get("shift", SD3_SHIFT)), "dynamic_shift": bool(sched.get("use_dynamic_shifting"))}


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(scale, shift) -> (shift, scale) along the output axis of an AdaLayerNormContinuous linear."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def crop_pos_table(table: torch.Tensor, grid: int) -> torch.Tensor:
    """SD3's centre crop of a [1, M*M, D] position table to grid x grid, row-major [grid*grid, D]."""
    table = table.reshape(-1, table.shape[-1])
    side = int(round(table.shape[0] ** 0.5))
    if side * side != table.shape[0] or grid > side:
        raise ValueError(f"position table with {table.shape[0]} rows cannot serve a {grid}x{grid} grid")
    top = (side - grid) // 2
    return table.view(side, side, -1)[top:top + grid, top:top + grid].reshape(grid * grid, -1)


def map_state_dict(state: dict[str, torch.Tensor], config: RectifiedFlowConfig) -> dict[str, torch.Tensor]:
    """Our state dict from diffusers' keys. Every diffusers key must be used: a leftover means a
    part of the network we would silently drop, so it is an error."""
    src = dict(state)
    out: dict[str, torch.Tensor] = {}

    def take(key: str) -> torch.Tensor:
        if key not in src:
            raise KeyError(f"diffusers checkpoint lacks {key!r}")
        return src.pop(key)

    def linear(dst: str, key: str, transform=lambda t: t) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = transform(take(f"{key}.weight")), transform(take(f"{key}.bias"))

    def fused_qkv(dst: str, keys: tuple[str, str, str]) -> None:
        for part in ("weight", "bias"):
            out[f"{dst}.{part}"] = torch.cat([take(f"{k}.{part}") for k in keys], dim=0)

    def norms(dst: str, q: str, k: str) -> None:
        if config.qk_norm:
            out[f"{dst}.q_norm.weight"], out[f"{dst}.k_norm.weight"] = take(f"{q}.weight"), take(f"{k}.weight")

    conv = take("pos_embed.proj.weight")  # [D, C, p, q] -> linear over (p q c)
    out["net.patch_embed.weight"] = conv.permute(0, 2, 3, 1).reshape(conv.shape[0], -1)
    out["net.patch_embed.bias"] = take("pos_embed.proj.bias")
    grid = config.image_size // config.patch_size
    if "pos_embed.pos_embed" in src:
        out["net.pos_embed"] = crop_pos_table(take("pos_embed.pos_embed"), grid)
    linear("net.time_embed.mlp.0", "time_text_embed.timestep_embedder.linear_1")
    linear("net.time_embed.mlp.2", "time_text_embed.timestep_embedder.linear_2")
    linear("condition.text_pooled.0", "time_text_embed.text_embedder.linear_1")
    linear("condition.text_pooled.2", "time_text_embed.text_embedder.linear_2")
    linear("condition.text_proj", "context_embedder")

    for i in range(config.depth):
        b, d = f"transformer_blocks.{i}", f"net.blocks.{i}"
        last = i == config.depth - 1
        linear(f"{d}.image.modulation", f"{b}.norm1.linear")
        linear(f"{d}.context.modulation", f"{b}.norm1_context.linear", swap_halves if last else (lambda t: t))
        fused_qkv(f"{d}.image.qkv", (f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v"))
        fused_qkv(f"{d}.context.qkv", (f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj"))
        norms(f"{d}.image", f"{b}.attn.norm_q", f"{b}.attn.norm_k")
        norms(f"{d}.context", f"{b}.attn.norm_added_q", f"{b}.attn.norm_added_k")
        linear(f"{d}.image.proj", f"{b}.attn.to_out.0")
        linear(f"{d}.image.mlp.0", f"{b}.ff.net.0.proj")
        linear(f"{d}.image.mlp.2", f"{b}.ff.net.2")
        if not last:
            linear(f"{d}.context.proj", f"{b}.attn.to_add_out")
            linear(f"{d}.context.mlp.0", f"{b}.ff_context.net.0.proj")
            linear(f"{d}.context.mlp.2", f"{b}.ff_context.net.2")
        if i in config.dual_attention_layers:
            fused_qkv(f"{d}.image.attn2.qkv", (f"{b}.attn2.to_q", f"{b}.attn2.to_k", f"{b}.attn2.to_v"))
            norms(f"{d}.image.attn2", f"{b}.attn2.norm_q", f"{b}.attn2.norm_k")
            linear(f"{d}.image.attn2.proj", f"{b}.attn2.to_out.0")

    linear("net.final.modulation", "norm_out.linear", swap_halves)
    linear("net.final.linear", "proj_out")
    if src:
        raise ValueError(f"diffusers keys with no place in starflow's MM-DiT: {sorted(src)[:8]}"
                         f"{' ...' if len(src) > 8 else ''}")
    return out


def from_diffusers_sd3(folder_or_state_dict: str | dict, config: dict | None = None, *,
                       image_size: int | None = None, shift: float | None = None,
                       dynamic_shift: bool | None = None) -> RectifiedFlow:
    """starflow RectifiedFlow from a diffusers SD3Transformer2DModel: a folder (config.json +
    safetensors; a sibling scheduler/ folder supplies shift and dynamic shifting) or a state dict
    with its config dict. Returns the model in float32 on the CPU, in eval mode."""
    sched = {}
    if isinstance(folder_or_state_dict, (str, os.PathLike)):
        folder_config, state = read_diffusers_folder(str(folder_or_state_dict))
        config = config if config is not None else folder_config
        sched = scheduler_options(str(folder_or_state_dict))
    else:
        state = folder_or_state_dict
        if config is None:
            raise ValueError("a state dict needs its SD3Transformer2DModel config dict")
    ours = config_from_diffusers_sd3(
        {k: v for k, v in config.items() if not k.startswith("_")}, image_size=image_size,
        shift=shift if shift is not None else sched.get("shift", SD3_SHIFT),
        dynamic_shift=dynamic_shift if dynamic_shift is not None else sched.get("dynamic_shift", False))
    model = RectifiedFlow(ours)
    mapped = map_state_dict(state, ours)
    mapped = {k: v.float() for k, v in mapped.items()}
    mapped.setdefault("net.pos_embed", model.net.pos_embed)  # no table in the checkpoint: SD3 computes it
    # SD3 has no learned null (its unconditional branch is the empty prompt): zero placeholders.
    mapped["condition.null_text"] = torch.zeros(ours.width)
    mapped["condition.null_pooled"] = torch.zeros(ours.width)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise ValueError(f"conversion left parameters unset: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()
