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
        if not sep or "." not in key or key.split(".")[0] not in ("model", "train"):
            raise ValueError(f"--set expects SECTION.KEY=VALUE with SECTION model or train, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: F401  (import cost only when running)

    from starflow.config import load_run_config
    from starflow.data import build_dataset
    from starflow.flow.model import STARFlow
    from starflow.train.trainer import Trainer

    apply_threads(args.threads)
    overrides = parse_overrides(args.set)
    if args.out_dir:
        overrides["train.out_dir"] = args.out_dir
    if args.steps:
        overrides["train.steps"] = args.steps
    overrides["train.device"] = args.device
    run_cfg = load_run_config(args.config, overrides)
    mcfg, tcfg = run_cfg.model, run_cfg.train
    dataset = build_dataset(tcfg.dataset, "train", tcfg.image_size, tcfg.channels)
    shape = tuple(dataset.image_shape)
    expected = (mcfg.in_channels, mcfg.image_size, mcfg.image_size)
    if shape != expected:
        raise ValueError(f"dataset {tcfg.dataset!r} has images of shape {shape} but the model expects {expected} "
                         "(model.in_channels, model.image_size)")
    if mcfg.num_classes and getattr(dataset, "num_classes", 0) > mcfg.num_classes:
        raise ValueError(f"dataset has {dataset.num_classes} classes but model.num_classes is {mcfg.num_classes}")
    model = STARFlow(mcfg)
    labels = [i % mcfg.num_classes for i in range(16)] if mcfg.num_classes else None
    trainer = Trainer(model, dataset, tcfg, sample_labels=labels)
    print(f"model: {model.num_params() / 1e6:.2f}M parameters, blocks {mcfg.block_layers()} layers; "
          f"dataset {tcfg.dataset} ({len(dataset)} images); device {trainer.device}")
    out = trainer.train(resume=args.resume)
    print(f"saved model to {out}")
    return 0
