"""``starflow train``: train a model from a YAML recipe (configs/*.yaml), resumable."""
from __future__ import annotations

import argparse

import yaml

from starflow.cli.common import add_device_arg, add_threads_arg, apply_threads


def add_parser(sub, name):
    p = sub.add_parser(name, help="train a model from a YAML recipe")
    p.add_argument("--config", required=True, help="YAML recipe with 'model' and 'train' sections")
    p.add_argument("--out-dir", help="overrides train.out_dir")
    p.add_argument("--steps", type=int, help="overrides train.steps")
    p.add_argument("--resume", help="'auto' (newest valid checkpoint in out-dir) or a checkpoint folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any config field, e.g. --set model.width=64 (value parsed as YAML)")
    add_device_arg(p)
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
        out[key] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    from starflow.config import load_run_config
    from starflow.train.build import build_trainer

    apply_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.out_dir:
        overrides["train.out_dir"] = args.out_dir
    if args.steps:
        overrides["train.steps"] = args.steps
    overrides["train.device"] = args.device
    run_cfg = load_run_config(args.config, overrides)
    trainer = build_trainer(run_cfg)
    m = trainer.model
    print(f"model: {run_cfg.model_type}, {m.num_params() / 1e6:.2f}M parameters; dataset {run_cfg.train.dataset} "
          f"({len(trainer.dataset)} examples, {'latent' if run_cfg.train.autoencoder else 'pixel'} space); "
          f"device {trainer.device}")
    out = trainer.train(resume=args.resume)
    print(f"saved model to {out}")
    return 0
