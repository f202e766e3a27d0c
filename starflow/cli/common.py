"""Options and helpers shared by several sub-commands."""
from __future__ import annotations

import argparse

import torch

from starflow.train.distributed import resolve_device  # noqa: F401  (re-exported for the sub-commands)


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                   help="where to run (auto: cuda if available, else cpu)")


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0 = torch's default). On a busy machine 1 is often much faster.")


def apply_threads(n: int) -> None:
    if n < 0:
        raise ValueError(f"--threads must be >= 0, got {n}")
    if n:
        torch.set_num_threads(n)

