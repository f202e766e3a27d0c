"""``starflow train``: train a model from a YAML recipe (configs/*.yaml), resumable.

Runs unchanged under ``torchrun`` (one process per GPU, or ``--nproc_per_node N`` CPU processes on
gloo): see docs/training_on_many_gpus.md. Exit status 128 + signal number (143 for SIGTERM, 130 for
SIGINT) after an interruption that saved a checkpoint; ``--resume auto`` continues from it."""
from __future__ import annotations

import argparse

import yaml

from starflow.cli.common import add_command, add_device_arg, add_threads_arg, apply_threads
from starflow.models import model_types


def add_parser(sub, name):
    p = add_command(sub, name, "train a model from a YAML recipe", description=__doc__)
    p.add_argument("--config", required=True, help="YAML recipe with 'model' and 'train' sections")
    p.add_argument("--model", choices=model_types(),
                   help="model family; overrides the recipe's model_type (its 'model' fields must fit that family)")
    p.add_argument("--out-dir", help="overrides train.out_dir")
    p.add_argument("--steps", type=int, help="overrides train.steps")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in out-dir) or a checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.width=64 (value parsed as YAML)")
    p.add_argument("--distributed", choices=["ddp", "fsdp"],
                   help="under torchrun: replicate (ddp, default) or fully shard (fsdp) the model; overrides train.distributed")
    add_device_arg(p)
    p.set_defaults(device=None)  # absent: the recipe's train.device decides (its default is auto)
    add_threads_arg(p)
    return p


def parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if key == "model_type":
            out[key] = value
            continue
        if not sep or "." not in key or key.split(".")[0] not in ("model", "train"):
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION model or train, got {item!r}")
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ValueError(f"--set {item!r}: the value is not valid YAML ({' '.join(str(e).split()[:8])} ...)") from None
    return out


def run(args: argparse.Namespace) -> int:
    import sys

    from starflow.train.recipe import load_run_config  # lazy: sub-command help must not import torch
    from starflow.train import distributed  # lazy: sub-command help must not import torch
    from starflow.train.build import build_trainer  # lazy: sub-command help must not import torch
    from starflow.train.trainer import TrainingInterrupted  # lazy: sub-command help must not import torch

    apply_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.out_dir:
        overrides["train.out_dir"] = args.out_dir
    if args.steps is not None:
        overrides["train.steps"] = args.steps
    if args.distributed:
        overrides["train.distributed"] = args.distributed
    if args.device:
        overrides["train.device"] = args.device
    if args.model:
        overrides["model_type"] = args.model
    run_cfg = load_run_config(args.config, overrides)
    try:
        trainer = build_trainer(run_cfg)
        main = trainer.is_main
        if main:
            n = trainer.model.num_params() if hasattr(trainer.model, "num_params") else 0
            world = trainer.dist.world_size
            print(f"model: {run_cfg.model_type}, {n / 1e6:.2f}M parameters; dataset {run_cfg.train.dataset} "
                  f"({len(trainer.dataset)} examples, {'latent' if run_cfg.train.autoencoder else 'pixel'} space); "
                  f"device {trainer.device}" + (f"; {world} ranks, {run_cfg.train.distributed}" if world > 1 else ""),
                  flush=True)
        if main:
            out_dir = run_cfg.train.out_dir
            print(f"writing to {out_dir}: log.jsonl (metrics), samples/ (grids), checkpoints/, model/", flush=True)
        try:
            out = trainer.train(resume=args.resume)
        except TrainingInterrupted as e:
            if main:
                print(f"{e}; continue with --resume auto", file=sys.stderr)
            return 128 + int(e.signum)
        if main:
            print(f"saved model to {out}")
        return 0
    finally:
        distributed.cleanup()
