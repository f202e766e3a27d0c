"""``starflow convert-starflow``: an official apple/ml-starflow ``.pth`` checkpoint -> a pipeline folder.

    starflow convert-starflow starflow_3B_t2i_256x256.pth --config starflow_3B_t2i_256x256.yaml \\
        --out starflow-3b --text-encoder ./flan-t5-xl --vae ./sd-vae-ft-ema

The folder (``model/`` safetensors + config.json, ``autoencoder/``, ``model_index.json`` naming the text
encoder folder) loads with ``StarflowPipeline.from_pretrained`` and ``starflow generate --model``.
Everything is checked before anything is written; the folder appears only when complete.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

DTYPES = {"bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16",
          "float32": "float32", "fp32": "float32"}


def add_parser(sub, name):
    p = sub.add_parser(name, help="convert an official apple/ml-starflow checkpoint (.pth) into a pipeline folder")
    p.add_argument("checkpoint", help="the official .pth state dict (read with weights_only=True, mmap=True)")
    p.add_argument("--config", required=True,
                   help="the official training YAML (e.g. starflow_3B_t2i_256x256.yaml), or JSON with the "
                        "Model(...) arguments (optionally under a 'config' key)")
    p.add_argument("--out", required=True, help="output pipeline folder (must not exist, or be empty)")
    p.add_argument("--text-encoder", help="local transformers folder of the text encoder (flan-T5-XL)")
    p.add_argument("--vae", help="local diffusers AutoencoderKL folder (sd-vae-ft-ema)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="stored weight dtype (default bfloat16)")
    p.add_argument("--noise-std", type=float, help="training noise of the latents (default: the config's noise_std)")
    return p


def _read_config(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise FileNotFoundError(f"config not found: {path}")
    with open(path) as f:
        cfg = yaml.safe_load(f)  # YAML is a superset of JSON
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping of official Model arguments")
    return cfg.get("config", cfg)


def _text_width(folder: str) -> int:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--text-encoder {folder}: no config.json (expected a transformers folder)")
    with open(path) as f:
        cfg = json.load(f)
    return int(cfg.get("d_model") or cfg.get("hidden_size") or 0)


def _check_out(out: str) -> None:
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ValueError(f"--out {out} exists and is not an empty folder; refusing to overwrite it")


def run(args) -> int:
    import torch

    from starflow.convert.pth import load_state_dict_pth  # lazy: sub-command help must not import torch
    # lazy: sub-command help must not import torch
    from starflow.convert.starflow import detect_prefix, from_starflow, inference_memory, resolve_config
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch

    if not args.checkpoint.endswith((".pth", ".pt", ".bin")):
        raise ValueError(f"{args.checkpoint}: expected the official .pth state dict")
    _check_out(args.out)
    official = _read_config(args.config)
    dtype = getattr(torch, DTYPES[args.dtype])
    state = load_state_dict_pth(args.checkpoint)
    prefix = detect_prefix(state)
    cfg = resolve_config(official, state, prefix)
    mem = inference_memory(cfg, dtype)
    gib = 1024 ** 3
    print(f"model: {cfg.num_blocks} blocks, width {cfg.width}, deep block {cfg.deep_layers} layers; "
          f"memory to sample one guided image in {args.dtype}: weights {mem['weights'] / gib:.2f} GiB + "
          f"KV cache {mem['kv_cache'] / gib:.2f} GiB = {mem['total'] / gib:.2f} GiB (+ text encoder and VAE)")
    if args.text_encoder and cfg.cond_dim and _text_width(args.text_encoder) != cfg.cond_dim:
        raise ValueError(f"--text-encoder {args.text_encoder} gives {_text_width(args.text_encoder)}-wide states; "
                         f"the checkpoint's proj_txt reads {cfg.cond_dim}")
    autoencoder = None
    if args.vae:
        from starflow.components.autoencoder import Autoencoder  # lazy: sub-command help must not import torch

        autoencoder = Autoencoder.from_pretrained(args.vae, latent_channels=cfg.in_channels)
    model = from_starflow(state, cfg, prefix, dtype=dtype)
    noise_std = args.noise_std if args.noise_std is not None else float(
        _official_value(official, "noise_std") or 0.0)

    out = os.path.abspath(args.out)
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".convert-")
    try:
        pipe = StarflowPipeline(model, autoencoder, None, noise_std, "decoder" if autoencoder is not None else "none")
        pipe.save_pretrained(tmp)
        if args.text_encoder:
            index_path = os.path.join(tmp, "model_index.json")
            with open(index_path) as f:
                index = json.load(f)
            index["text_encoder"] = {"name": os.path.abspath(args.text_encoder), "max_length": cfg.max_text_tokens}
            with open(index_path, "w") as f:
                json.dump(index, f, indent=2)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"converted {model.num_params() / 1e6:.1f}M parameters -> {out}")
    return 0


def _official_value(cfg: dict, key: str):
    from starflow.convert.starflow import normalise_official_config  # lazy: sub-command help must not import torch

    return normalise_official_config(cfg).get(key)
