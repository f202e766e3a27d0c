"""``starflow plot RUN_DIR``: training curves (loss, bits/dim for pixel runs, FD), a contact sheet of the
sample grids over training; optionally the guidance-sweep and model-comparison figures from benchmark
JSON files (schemas in ``starflow.evaluation.plots``)."""
from __future__ import annotations

import os

from starflow.cli.common import add_command


def add_parser(sub, name):
    p = add_command(sub, name, "plot a training run (loss, bits/dim, FD, samples) and benchmark JSON files",
                    description=__doc__)
    p.add_argument("run_dir", nargs="?", help="training output directory (holds log.jsonl, samples/)")
    p.add_argument("--out", help="output folder (default: RUN_DIR/plots, or . without RUN_DIR)")
    p.add_argument("--space", default="auto", choices=["auto", "pixel", "latent"],
                   help="pixel runs get a bits/dim panel (default: read from the run's config)")
    p.add_argument("--guidance-sweep", metavar="JSON", help="also plot this starflow.guidance_sweep/1 file")
    p.add_argument("--model-comparison", metavar="JSON", help="also plot this starflow.model_comparison/1 file")
    return p


def run(args) -> int:
    from starflow.cli.common import require_extra  # lazy: sub-command help must not import torch

    require_extra("matplotlib", "plot", "starflow plot")
    from starflow.evaluation import plots  # lazy: sub-command help must not import torch

    if not (args.run_dir or args.guidance_sweep or args.model_comparison):
        raise ValueError("give RUN_DIR and/or --guidance-sweep / --model-comparison")
    out = args.out or (os.path.join(args.run_dir, "plots") if args.run_dir else ".")
    written, notes = [], []
    if args.run_dir:
        if not os.path.isdir(args.run_dir):
            raise FileNotFoundError(f"run directory {args.run_dir!r} does not exist")
        paths, notes = plots.plot_run(args.run_dir, out, space=args.space)
        written += paths
    for path, fn, name in ((args.guidance_sweep, plots.plot_guidance_sweep, "guidance_sweep.png"),
                           (args.model_comparison, plots.plot_model_comparison, "model_comparison.png")):
        if path:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} does not exist")
            written.append(fn(path, os.path.join(out, name)))
    for n in notes:
        print(f"note: {n}")
    for p in written:
        print(f"wrote {p}")
    if not written:
        print(f"no figures written (nothing to plot in {args.run_dir})")
    return 0
