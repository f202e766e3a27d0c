"""``starflow convert-tarflow``: import an official TARFlow checkpoint (safetensors state dict)."""
from __future__ import annotations


from starflow.cli.common import add_command


def add_parser(sub, name):
    p = add_command(sub, name, "convert an official apple/ml-tarflow checkpoint")
    p.add_argument("checkpoint", help="safetensors state dict of transformer_flow.Model")
    p.add_argument("--config", required=True,
                   help="JSON with the official Model(...) arguments (in_channels, img_size, patch_size, "
                        "channels, num_blocks, layers_per_block, nvp, num_classes), or a file with a 'config' key")
    p.add_argument("--out", required=True, help="output model directory")
    return p


def run(args) -> int:
    from starflow.convert.tarflow import from_tarflow  # lazy: sub-command help must not import torch

    from starflow.errors import check_output_dir  # lazy: sub-command help must not import torch
    from starflow.io.hub import read_json  # lazy: sub-command help must not import torch

    check_output_dir(args.out, "--out")
    cfg = read_json(args.config, "--config")
    cfg = cfg.get("config", cfg)
    model = from_tarflow(args.checkpoint, cfg)
    model.save_pretrained(args.out)
    print(f"converted {model.num_params() / 1e6:.2f}M parameters -> {args.out}")
    return 0
