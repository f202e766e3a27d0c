"""The ``starflow`` command. Each sub-command lives in its own module with ``add_parser`` and ``run``."""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> module under starflow.cli; a module defines add_parser(subparsers) and run(args).
COMMANDS = {
    "generate": "generate",
    "train": "train",
    "sample": "sample",
    "nll": "nll",
    "convert-tarflow": "convert",
    "convert-sd3": "convert_sd3",
    "convert-starflow": "convert_starflow",
    "eval": "eval",
    "train-autoencoder": "train_autoencoder",
    "finetune-decoder": "finetune_decoder",
    "serve": "serve",
    "plot": "plot",
    "encode": "encode",
    "decode": "decode",
    "inpaint": "inpaint",
    "edit": "edit",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starflow", description="Normalizing-flow image generation.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"starflow.cli.{module}")
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except (ValueError, FileNotFoundError, KeyError, NotImplementedError) as e:
        print(f"starflow {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
