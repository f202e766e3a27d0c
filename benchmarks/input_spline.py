"""Where a pixel flow's bits go, and how much an input spline takes back (starflow/flow/input_spline.py).

1. Per-pixel bits of the test digits under a trained pixel-likelihood flow (``STARFlow.nll_map``: the
   exact NLL split over dimensions), grouped by pixel value; the groups sum to the model's bits/dim.
2. The ablation: the flow frozen, only an added input spline trained for ``--steps`` on the training
   digits, once from a uniform knot grid and once from the edge-refined grid the model uses; test bits/dim
   before and after each.

    python benchmarks/input_spline.py --model mnist-likelihood --steps 300 --threads 1
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from starflow.data import spaces
from starflow.data.digits import load_mnist_subset
from starflow.evaluation.likelihood import evaluate_nll
from starflow.flow.input_spline import InputSpline
from starflow.pipeline import StarflowPipeline
from starflow.tasks.encode import image_bits_map


def load_flow(spec: str):
    """The flow of a shipped name or a pipeline / model folder, float32, in eval mode."""
    return StarflowPipeline.from_pretrained(spec).model.float().eval()


def breakdown(model, images: torch.Tensor, seed: int = 0) -> dict:
    bits = image_bits_map(model, images, generator=torch.Generator().manual_seed(seed))  # its mean is the bits/dim
    v = images.float()
    near_stroke = F.max_pool2d((v > 0).float(), 7, 1, 3) > 0  # within 3 pixels of any ink
    groups = {"black, >3 px from ink": (v == 0) & ~near_stroke, "black, near ink": (v == 0) & near_stroke,
              "bright (>= 250)": v >= 250, "mid (1-249)": (v > 0) & (v < 250)}
    out = {"bits_per_dim": bits.mean().item()}
    for name, mask in groups.items():
        out[name] = {"share": mask.float().mean().item(), "bits_per_pixel": bits[mask].mean().item(),
                     "bits_per_dim_contribution": bits[mask].sum().item() / bits.numel()}
    return out


def test_bpd(model, images: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(0)
    return evaluate_nll(lambda x, y: model.bits_per_dim(x, generator=g), images, unit="bits/dim")["mean"]


def spline_only(spec: str, grid: str, bins: int, steps: int, lr: float, train, test) -> dict:
    model = load_flow(spec)
    model.requires_grad_(False)
    model.input_spline = InputSpline(model.config.in_channels, bins)
    if grid == "uniform":
        with torch.no_grad():
            model.input_spline.widths.zero_()
            model.input_spline.heights.zero_()
    opt = torch.optim.Adam(model.input_spline.parameters(), lr=lr)
    torch.manual_seed(0)
    t = time.perf_counter()
    for _ in range(steps):
        loss = model.nll(spaces.dequantize(train[torch.randint(0, len(train), (64,))])).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"grid": grid, "bins": bins, "steps": steps, "lr": lr, "seconds": time.perf_counter() - t,
            "test_bits_per_dim": test_bpd(model, test), "breakdown": breakdown(model, test[:200])}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mnist-likelihood", help="a pixel flow trained on mnist (shipped name or folder)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--bins", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-2)
    ap.add_argument("--grids", default="uniform,edges")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--figure", default=None, help="draw test digits and their bits maps (PNG) here")
    ap.add_argument("--baseline", default=None, help="with --figure: a second model's maps in a row below")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    train = torch.from_numpy(load_mnist_subset("train")[0])[:, None]
    test = torch.from_numpy(load_mnist_subset("test")[0])[:, None]
    model = load_flow(args.model)
    result = {"model": args.model, "test_bits_per_dim": test_bpd(model, test), "breakdown": breakdown(model, test[:200])}
    print(f"{args.model}: test {result['test_bits_per_dim']:.4f} bits/dim; per pixel (first 200 test digits):")
    for k, v in result["breakdown"].items():
        if isinstance(v, dict):
            print(f"  {k:24s} {v['share']:6.1%} of pixels, {v['bits_per_pixel']:.3f} bits each, "
                  f"{v['bits_per_dim_contribution']:.3f} of the bits/dim")
    if model.input_spline is None:
        result["spline_only"] = []
        for grid in args.grids.split(","):
            r = spline_only(args.model, grid, args.bins, args.steps, args.lr, train, test)
            result["spline_only"].append(r)
            print(f"flow frozen + {grid} {args.bins}-bin spline, {args.steps} Adam steps (lr {args.lr}, "
                  f"{r['seconds']:.0f} s): test {r['test_bits_per_dim']:.4f} bits/dim; black pixels far from ink "
                  f"{r['breakdown']['black, >3 px from ink']['bits_per_pixel']:.3f} bits each")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    if args.figure:
        rows = [(args.model, model)]
        if args.baseline:
            rows.append((args.baseline, load_flow(args.baseline)))
        figure(rows, test[::50][:10], args.figure)  # one digit of each class (the split is sorted by class)


def figure(rows, images: torch.Tensor, path: str) -> None:
    """Test digits over each model's bits map, one colour scale for all maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    maps = [(name, image_bits_map(m, images, generator=torch.Generator().manual_seed(0))[:, 0]) for name, m in rows]
    vmax = max(float(torch.quantile(b.flatten(), 0.995)) for _, b in maps)  # a few pixels reach 50 bits
    fig, axes = plt.subplots(1 + len(maps), len(images), figsize=(1.3 * len(images), 1.45 * (1 + len(maps))))
    for j in range(len(images)):
        axes[0, j].imshow(images[j, 0], cmap="gray")
        for i, (name, bits) in enumerate(maps, start=1):
            im = axes[i, j].imshow(bits[j].clamp(0, vmax), cmap="magma", vmin=0, vmax=vmax)
            axes[i, j].set_title(f"{bits[j].mean():.2f}", fontsize=7)
        for a in axes[:, j]:
            a.set_xticks([])
            a.set_yticks([])
    for i, (name, _) in enumerate(maps, start=1):
        axes[i, 0].set_ylabel(("--model\n" if i == 1 else "--baseline\n") + os.path.basename(name.rstrip("/"))[:24], fontsize=6)
    fig.colorbar(im, ax=axes[1:].ravel().tolist(), shrink=0.8, label=f"bits per pixel (clipped at {vmax:.0f})")
    fig.suptitle("where the bits go: per-pixel NLL of test digits (title: the image's bits/dim)", fontsize=8)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
