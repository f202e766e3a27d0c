"""Import checkpoints written by the official STARFlow code (apple/ml-starflow, ``transformer_flow.Model``).

Their conventions, mapped onto ours (each a ``FlowConfig`` switch, see its field comments):
* ``rope`` -> ``positions="rope"`` (no position table; the ``feat_rope`` buffers are unused constants),
  ``sos`` -> ``start_token`` (``sos_embed``), ``use_softplus`` -> ``scale="softplus"``, ``soft_clip``,
  ``use_final_norm`` -> ``final_norm`` (their RMSNorm stores its gain as an offset from 1, as ours does),
  ``seq_order``, ``num_kv_heads``, ``use_swiglu`` -> ``mlp="swiglu"``, ``top_block_channels`` -> ``deep_width``;
* text states go through the deep block's ``proj_txt`` (our ``condition.text_proj``) as a prefix of
  ``txt_size`` zero-padded tokens, all attended (``text_padding="attend"``), and there is no learned null:
  guidance reads an explicit negative (they encode the empty prompt), so ``learned_null=False``;
* their patches flatten as (p1 p2 c), ours as (c p1 p2): token-space weights are permuted on import;
* their ``var`` buffer is an unused constant (ones); ``attn_mask`` buffers are constant causal masks.
"""
from __future__ import annotations

import math
import re

import torch

from starflow.flow.config import FlowConfig
from starflow.flow.model import STARFlow

_LAYER = re.compile(r"blocks\.(\d+)\.attn_blocks\.(\d+)\.(.*)")
_BLOCK = re.compile(r"blocks\.(\d+)\.(proj_in\.weight|proj_in\.bias|proj_out\.weight|proj_out\.bias|pos_embed|"
                    r"sos_embed|final_norm\.weight|proj_txt\.weight|proj_txt\.bias)$")
_CONSTANTS = re.compile(r"(blocks\.\d+\.attn_mask|var|feat_rope\.freqs_(cos|sin)|feat_rope_gen\.freqs_(cos|sin))$")
_UNSUPPORTED = ("use_pretrained_lm", "learnable_self_denoiser", "temporal_causal", "adaln", "use_post_norm",
                "use_qk_norm", "local_attn_window", "shallow_block_local")


def _flag(v) -> bool:
    return bool(int(v)) if isinstance(v, (str, int, float, bool)) and str(v) not in ("", "None") else False


def _layers(v) -> list[int]:
    if isinstance(v, str):
        return [int(t) for t in v.split()]
    if isinstance(v, int):
        return [v]
    return [int(t) for t in v]


def normalise_official_config(cfg: dict) -> dict:
    """The official arguments from a ``Model(...)`` kwargs dict or a training YAML's ``arguments`` list
    (``- channels: 3072`` entries; YAML names ``channel_size``/``blocks`` for ``in_channels``/``num_blocks``)."""
    if "arguments" in cfg:
        args = cfg["arguments"]
        cfg = {k: v for item in args for k, v in item.items()} if isinstance(args, list) else dict(args)
    cfg = dict(cfg)
    if "channel_size" in cfg:
        cfg.setdefault("in_channels", cfg.pop("channel_size"))
    if "blocks" in cfg:
        cfg.setdefault("num_blocks", cfg.pop("blocks"))
    return cfg


def config_from_starflow(in_channels: int, img_size: int, patch_size: int, channels: int, layers_per_block,
                         num_blocks: int | None = None, head_dim: int = 64, num_heads: int | None = None,
                         num_kv_heads: int | None = None, rope=False, sos=False, txt_size: int = 0, txt_dim: int = 0,
                         cond_top_only=False, use_softplus=False, use_swiglu=False, use_bias=True,
                         use_final_norm=False, norm_type: str = "layer_norm", soft_clip: float = 0,
                         seq_order: str = "R2L", top_block_channels: int | None = None, expansion: float = 4,
                         nvp=True, **others) -> FlowConfig:
    """Our FlowConfig for the official constructor arguments. ``img_size`` is the flow's input side (the
    latent side for a latent model). Switches this importer cannot represent are errors."""
    bad = [k for k in _UNSUPPORTED if _flag(others.get(k, 0))]
    if bad:
        raise ValueError(f"official STARFlow options not supported by this importer: {bad}")
    layers = _layers(layers_per_block)
    num_blocks = int(num_blocks or len(layers))
    if len(layers) == 1:
        layers = layers * num_blocks
    if len(layers) != num_blocks:
        raise ValueError(f"layers_per_block {layers} does not give {num_blocks} blocks")
    if len(set(layers[:-1])) > 1 or 0 in layers:
        raise ValueError(f"layers_per_block {layers}: only equal shallow blocks (and no identity blocks) are supported")
    if num_heads is not None and int(num_heads) * int(head_dim) != int(channels):
        raise ValueError(f"num_heads {num_heads} x head_dim {head_dim} != channels {channels}: not supported")
    if not _flag(use_bias) or norm_type != "layer_norm":
        raise ValueError("only use_bias=1 and norm_type=layer_norm are supported")
    if not _flag(nvp):
        raise ValueError("only affine (nvp) flows are supported")
    txt_dim, txt_size = int(txt_dim or 0), int(txt_size or 0)
    if txt_dim and not _flag(cond_top_only):
        raise ValueError("text read by every block (cond_top_only=0) is not supported; only the deep block's prefix")
    return FlowConfig(
        in_channels=int(in_channels), image_size=int(img_size), patch_size=int(patch_size), width=int(channels),
        head_dim=int(head_dim), mlp_ratio=float(expansion), num_blocks=num_blocks, layers_per_block=layers[0],
        deep_layers=layers[-1], cond_dim=txt_dim, max_text_tokens=txt_size or 32, cond_blocks="deep",
        cond_drop_prob=0.0, positions="rope" if _flag(rope) else "learned", start_token=_flag(sos),
        scale="softplus" if _flag(use_softplus) else "exp", soft_clip=float(soft_clip or 0),
        final_norm=_flag(use_final_norm), seq_order=str(seq_order),
        num_kv_heads=int(num_kv_heads) if num_kv_heads else None, mlp="swiglu" if _flag(use_swiglu) else "gelu",
        deep_width=int(top_block_channels) if top_block_channels and int(top_block_channels) != int(channels) else None,
        learned_null=False, text_padding="attend")


def _patch_order(cfg: FlowConfig) -> torch.Tensor:
    """index[i] = the official (p1 p2 c) position of our (c p1 p2) token channel i."""
    p, c = cfg.patch_size, cfg.in_channels
    ours = torch.arange(p * p * c).view(p, p, c).permute(2, 0, 1)  # official index laid out as (c, p1, p2)
    return ours.reshape(-1)


def convert_state_dict(state: dict[str, torch.Tensor], cfg: FlowConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Official keys -> ours; unknown keys are collected and reported together."""
    order = _patch_order(cfg)
    out, unknown = {}, []
    for key, value in state.items():
        if not key.startswith(prefix):
            unknown.append(key)
            continue
        key = key[len(prefix):]
        if _CONSTANTS.fullmatch(key):
            continue
        if m := _LAYER.fullmatch(key):
            out[f"blocks.{m[1]}.layers.{m[2]}.{m[3]}"] = value
            continue
        m = _BLOCK.fullmatch(key)
        if m is None:
            unknown.append(prefix + key)
            continue
        b, name = m[1], m[2]
        if name.startswith("proj_txt"):
            out[f"blocks.{b}.condition.text_proj.{name.split('.')[1]}"] = value
        elif name == "proj_in.weight" and value.ndim == 2 and value.shape[1] == order.numel():
            out[f"blocks.{b}.proj_in.weight"] = value[:, order]
        elif name.startswith("proj_out") and value.shape[0] == 2 * order.numel():
            out[f"blocks.{b}.{name}"] = torch.cat([half[order] for half in value.chunk(2, dim=0)])
        elif name == "sos_embed" and value.shape[-1] == order.numel():
            out[f"blocks.{b}.sos_embed"] = value[..., order]
        else:
            out[f"blocks.{b}.{name}"] = value
    if unknown:
        raise ValueError(f"unexpected keys in STARFlow checkpoint: {sorted(unknown)}")
    return out


def detect_prefix(state: dict[str, torch.Tensor]) -> str:
    return next((p for p in ("model.", "module.", "_orig_mod.") if any(k.startswith(p + "blocks.") for k in state)), "")


def infer_dims(state: dict[str, torch.Tensor], prefix: str = "", txt_size: int | None = None) -> dict:
    """What the weights say: token grid side, text width, block count (for checking a config)."""
    dims = {}
    if (v := state.get(prefix + "var")) is not None:
        dims["grid_side"] = math.isqrt(v.shape[0])
    elif (m := state.get(prefix + "blocks.0.attn_mask")) is not None and txt_size is not None:
        dims["grid_side"] = math.isqrt(m.shape[0] - txt_size)  # their mask covers text + image slots
    blocks = {int(m[1]) for k in state if (m := re.match(re.escape(prefix) + r"blocks\.(\d+)\.", k))}
    if blocks:
        dims["num_blocks"] = max(blocks) + 1
        if (w := state.get(f"{prefix}blocks.{max(blocks)}.proj_txt.weight")) is not None:
            dims["txt_dim"] = w.shape[1]
    return dims


def resolve_config(config: dict | FlowConfig, state: dict[str, torch.Tensor], prefix: str,
                   vae_downsample: int = 8) -> FlowConfig:
    """FlowConfig from ours or the official arguments, completed and checked against the weights: the text
    width comes from ``proj_txt`` when the config lacks it (YAMLs do); a pixel ``img_size`` (the YAML's
    256) is mapped to the latent side when the weights say so."""
    if isinstance(config, FlowConfig):
        return config
    cfg = normalise_official_config(config)
    dims = infer_dims(state, prefix, int(cfg.get("txt_size") or 0))
    if "txt_dim" in dims:
        if cfg.get("txt_dim") not in (None, 0, dims["txt_dim"]):
            raise ValueError(f"config txt_dim {cfg['txt_dim']} disagrees with the checkpoint's proj_txt "
                             f"input width {dims['txt_dim']}")
        cfg["txt_dim"] = dims["txt_dim"]
    if "grid_side" in dims and "img_size" in cfg and "patch_size" in cfg:
        side = int(cfg["img_size"]) // int(cfg["patch_size"])
        if side != dims["grid_side"] and side == dims["grid_side"] * vae_downsample:
            cfg["img_size"] = int(cfg["img_size"]) // vae_downsample
        elif side != dims["grid_side"]:
            raise ValueError(f"config img_size {cfg['img_size']} / patch_size {cfg['patch_size']} gives a {side}-token "
                             f"side; the checkpoint's buffers say {dims['grid_side']}")
    elif cfg.get("vae") and "img_size" in cfg:  # a training YAML gives pixels; the flow sees latents
        cfg["img_size"] = int(cfg["img_size"]) // vae_downsample
    return config_from_starflow(**cfg)


def from_starflow(state_dict: dict[str, torch.Tensor], config: dict | FlowConfig, prefix: str | None = None,
                  device="cpu", dtype: torch.dtype | None = None) -> STARFlow:
    """Build a STARFlow model from an official STARFlow state dict.

    ``config`` is our FlowConfig, the official ``Model(...)`` arguments, or a parsed training YAML (its
    ``arguments`` list). ``prefix`` is stripped from keys; by default ``model.``/``module.`` is detected.
    The model is built on the meta device and the checkpoint's tensors are assigned (no second copy);
    ``dtype`` casts them (e.g. ``torch.bfloat16`` for the 3B model on one device).
    """
    if prefix is None:
        prefix = detect_prefix(state_dict)
    cfg = resolve_config(config, state_dict, prefix)
    converted = convert_state_dict(state_dict, cfg, prefix)
    with torch.device("meta"):
        model = STARFlow(cfg)
    expected = model.state_dict()
    missing = sorted(k for k in expected if k not in converted and k != "prior_var")
    unexpected = sorted(k for k in converted if k not in expected)
    if missing or unexpected:
        raise ValueError(f"STARFlow checkpoint does not fit the config: missing {missing}, unexpected {unexpected}")
    wrong = [f"{k}: checkpoint {list(v.shape)} vs config {list(expected[k].shape)}"
             for k, v in converted.items() if v.shape != expected[k].shape]
    if wrong:
        raise ValueError("STARFlow checkpoint disagrees with the config: " + "; ".join(wrong[:8]))
    converted["prior_var"] = torch.ones(expected["prior_var"].shape)
    if dtype is not None:
        converted = {k: v.to(dtype) if v.is_floating_point() and k != "prior_var" else v for k, v in converted.items()}
    model.load_state_dict({k: v.to(device) for k, v in converted.items()}, assign=True)
    return model.eval()


def parameter_count(config: FlowConfig) -> int:
    """Exact parameter count of the model a config builds, without allocating it (meta device)."""
    with torch.device("meta"):
        return STARFlow(config).num_params()


def inference_memory(config: FlowConfig, dtype: torch.dtype = torch.bfloat16, batch: int = 1,
                     guided: bool = True) -> dict[str, int]:
    """Bytes needed to sample: the weights, plus the deep block's key/value cache (the largest; shallow
    blocks' caches are freed before the next block) for ``batch`` images, doubled under guidance."""
    size = torch.empty((), dtype=dtype).element_size()
    weights = parameter_count(config) * size
    width = config.deep_width or config.width
    heads = config.num_kv_heads or width // config.head_dim
    slots = config.num_tokens + (config.max_text_tokens if config.cond_dim else 1 if config.num_classes else 0) + 1
    rows = batch * (2 if guided and config.conditional else 1)
    kv = 2 * (config.deep_layers or config.layers_per_block) * rows * heads * slots * config.head_dim * size
    return {"weights": weights, "kv_cache": kv, "total": weights + kv}
