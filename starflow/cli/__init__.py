"""The ``starflow`` command. Each sub-command lives in its own module with ``add_parser`` and ``run``.

Building the parser imports every sub-command module, so those modules import nothing heavy (torch,
diffusers, transformers) at module level: ``starflow --help`` stays fast. Heavy imports go in ``run``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from starflow.errors import StarflowError, os_error_message

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
    "example": "example",
}


DESCRIPTION = """Normalizing-flow image generation.

Shipped models, usable by name from any folder: mnist (class-conditional digits), shapes (text to
image), edit (instruction editing). Try:
  starflow generate --prompt "two red circles above a blue square"
  starflow generate --class 3 -n 16 --out threes.png
  starflow COMMAND --help"""


class _CommandParser(argparse.ArgumentParser):
    """A sub-command's parser: an unknown option is reported with this sub-command's usage, not the
    top-level one (argparse otherwise hands unknown options up to the main parser)."""

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="starflow", description=DESCRIPTION,
                                     epilog="--debug (anywhere) or STARFLOW_DEBUG=1: show tracebacks of errors",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_CommandParser)
    for name, module in COMMANDS.items():
        mod = importlib.import_module(f"starflow.cli.{module}")
        p = mod.add_parser(sub, name)
        p.set_defaults(_run=mod.run)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can cause and fix (bad files, configs, sizes, paths, full disks, busy ports)."""
    import yaml
    from PIL import Image
    from safetensors import SafetensorError


    return (StarflowError, ValueError, OSError, KeyError, NotImplementedError, yaml.YAMLError,
            Image.DecompressionBombError, SafetensorError)


def _one_line(e: BaseException) -> str:

    if isinstance(e, OSError) and not isinstance(e, StarflowError):
        text = os_error_message(e)
    elif isinstance(e, KeyError):
        text = f"missing entry {e}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    """Run one sub-command. Expected failures print one line and return 2; ``--debug`` (anywhere on
    the command line) or ``STARFLOW_DEBUG=1`` lets them raise with their traceback instead."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("STARFLOW_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return args._run(args) or 0
    except _expected_errors() as e:
        if debug:
            raise
        print(f"starflow {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
