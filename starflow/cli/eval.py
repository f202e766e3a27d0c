"""``starflow eval CHECKPOINT --metrics fd,pr,acc,nll --num-samples N --dataset mnist --out results.json``

Samples N images from the checkpoint, scores them against the dataset's held-out split, prints one table
and writes the JSON report documented in ``starflow/evaluation/report.py`` (schema "starflow.eval/1").
"""
from __future__ import annotations

import argparse
import json
import os

from starflow.cli.common import (add_command, require_extra, add_device_arg, add_model_arg, add_threads_arg, apply_threads,
                                 model_spec, resolve_device)
from starflow.cli.sample import add_decoding_args


def _sample_arg(text: str):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--sample-arg takes KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass  # keep as string
    return key.strip(), value


def _check_sample_args(pipe, kwargs: dict) -> None:
    """Refuse --sample-arg keys the model's sampler does not take (before any evaluation work)."""
    import dataclasses
    import inspect

    flow = getattr(pipe, "model", pipe)
    allowed = set()
    for fn in (getattr(flow, "sample", None), getattr(flow, "inverse", None)):
        if fn is not None:
            allowed |= {n for n, p in inspect.signature(fn).parameters.items()
                        if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if getattr(flow, "model_type", "") == "starflow":
        from starflow.flow.sampling import SamplerOptions  # lazy: sub-command help must not import torch

        allowed |= {f.name for f in dataclasses.fields(SamplerOptions)}
    allowed -= {"self", "n", "z", "x", "y", "text", "generator", "device"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"--sample-arg: unknown sampling option(s) {unknown}; this model takes {sorted(allowed)}")


def add_parser(subparsers, name: str = "eval") -> argparse.ArgumentParser:
    p = add_command(subparsers, name, "evaluate a checkpoint: FD-EffNetLite0, precision/recall, accuracy, NLL",
                    description=__doc__)
    add_model_arg(p, "none: required", positional=True)
    p.add_argument("--metrics", default="fd,pr,acc,nll", help="comma-separated subset of fd,fid,pr,acc,nll")
    p.add_argument("--num-samples", type=int, default=1000, help="number of generated images")
    p.add_argument("--dataset", default="mnist", help="reference dataset: mnist, digits or folder:PATH")
    p.add_argument("--ref-split", default="test", choices=["test", "train"],
                   help="reference split for FD/PR and the split for NLL (default: held-out test)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=100, help="sampling / NLL batch size")
    p.add_argument("--feature-size", type=int, default=128,
                   help="input size for EfficientNet-Lite0 features (part of the metric's definition)")
    p.add_argument("--inception-weights", default=None,
                   help="local pt_inception-2015-12-05 weights file, needed for the 'fid' metric")
    p.add_argument("--cache-dir", default=None, help="reference-statistics cache (default: $STARFLOW_CACHE_DIR/eval_stats, else "
                                                     "~/.cache/starflow/eval_stats)")
    p.add_argument("--no-baseline", action="store_true", help="skip the real-images baseline rows")
    p.add_argument("--nll-max", type=int, default=None, help="score a seeded random subset of N split images for NLL (default: all)")
    p.add_argument("--sample-arg", action="append", type=_sample_arg, default=[], metavar="KEY=VALUE",
                   help="keyword for model.sample (JSON value), e.g. --sample-arg guidance=1.5; repeatable. Samples "
                        "are drawn at the model's stored settings (model_index.json \"sampling\", as starflow "
                        "generate draws them) where these do not say otherwise: --sample-arg guidance=0 is unguided")
    p.add_argument("--quiet", action="store_true", help="print only the table")
    add_decoding_args(p)
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    # lazy: sub-command help must not import torch
    from starflow.evaluation.report import evaluate_model, format_table, parse_metrics, validate_report, write_json

    metrics = parse_metrics(args.metrics)  # fail on typos before loading anything
    if {"fd", "pr"} & set(metrics):
        require_extra("efficientnet_lite_pytorch", "eval", "FD / precision-recall (EfficientNet-Lite0 features)")
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    spec = model_spec(args)
    if spec is None:
        raise ValueError("name the model to evaluate: starflow eval mnist (or --model NAME|DIR)")
    apply_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.nll_max is not None and args.nll_max < 1:
        raise ValueError(f"--nll-max must be >= 1, got {args.nll_max}")
    if args.out:
        import os

        from starflow.errors import check_output_dir  # lazy: sub-command help must not import torch

        check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
        if os.path.isdir(args.out):
            raise ValueError(f"--out {args.out} is a folder; give a file path for the JSON report")
    device = resolve_device(args.device)
    from starflow.pipeline import load_pretrained  # lazy: sub-command help must not import torch

    model = load_pretrained(spec, map_location=str(device), denoise=args.denoise, decoder=args.decoder)
    if hasattr(model, "to"):
        model = model.to(device) or model
    if hasattr(model, "eval"):
        model.eval()
    from starflow.evaluation.frechet import default_cache_dir  # lazy: sub-command help must not import torch

    cache_dir = args.cache_dir or default_cache_dir()
    cached_before = _cache_files(cache_dir)
    # the model's own sampling settings, as `starflow generate` uses them, under the user's --sample-arg
    sample_kwargs = {**(getattr(model, "sampling", None) or {}), **dict(args.sample_arg)}
    _check_sample_args(model, sample_kwargs)
    log = None if args.quiet else (lambda msg: print(msg, flush=True))
    report = evaluate_model(
        model, metrics, dataset=args.dataset, num_samples=args.num_samples, ref_split=args.ref_split,
        seed=args.seed, batch_size=args.batch_size, image_size=args.feature_size, cache_dir=cache_dir,
        inception_weights=args.inception_weights, baseline=not args.no_baseline,
        sample_kwargs=sample_kwargs, checkpoint=spec, nll_max=args.nll_max, log=log,
    )
    validate_report(report)
    print(format_table(report))
    if sample_kwargs and any(k in report["metrics"] for k in ("fd", "fid", "pr", "acc")):
        print("sampled with " + ", ".join(f"{k}={v}" for k, v in sample_kwargs.items()))
    for w in report["warnings"]:
        print(f"note: {w}")
    new = _cache_files(cache_dir) - cached_before
    if new:  # said once: when the cache is written, not on every later run that reads it
        size = sum(os.path.getsize(os.path.join(cache_dir, f)) for f in _cache_files(cache_dir))
        print(f"cached reference statistics in {cache_dir} ({len(new)} new file(s); cache now {size / 1e6:.1f} MB; "
              "--cache-dir or STARFLOW_CACHE_DIR puts it elsewhere)")
    if args.out:
        write_json(report, args.out)
        print(f"wrote {args.out}")
    return 0


def _cache_files(directory: str) -> set[str]:
    try:
        return {f for f in os.listdir(directory) if os.path.isfile(os.path.join(directory, f))}
    except OSError:
        return set()
