"""Calibrate the selective / segment / auto samplers of a pixel-space class-conditional model on its
training images, and store the calibration next to the model's weights.

    python benchmarks/calibrate_sampling.py                       # the shipped MNIST model, 256 images
    python benchmarks/calibrate_sampling.py --checkpoint DIR --dataset mnist --images 256 --threads 1

The training images are dequantised and noised as in training (``--noise-std``), so the calibration set
is what the flow was trained on. Timings are this device's; ``auto`` on another device falls back to
the sequential sampler until it is calibrated there.
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from starflow.data import DigitsDataset
from starflow.flow.selective_jacobi import calibrate, save_calibration
from starflow.io.images import dequantize
from starflow.io.shipped import PIXEL_DIGITS_MODEL
from starflow.pipeline import load_pretrained


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=PIXEL_DIGITS_MODEL, help="pipeline or model directory")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "digits"])
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--noise-std", type=float, default=0.1, help="the training noise augmentation")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_pretrained(args.checkpoint).model.eval()
    model_dir = os.path.join(args.checkpoint, "model") if os.path.isdir(os.path.join(args.checkpoint, "model")) else args.checkpoint
    ds = DigitsDataset(args.dataset, "train")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ds), generator=g)[:args.images]
    images, labels = ds.get_batch(idx)
    x = dequantize(images, generator=g) + args.noise_std * torch.randn(images.shape, generator=g)
    t = time.perf_counter()
    cal = calibrate(model, x, tolerance=args.tolerance, threshold=args.threshold,
                    batches=tuple(int(b) for b in args.batch_sizes.split(",")), y=labels)
    print(f"calibrated on {len(idx)} {args.dataset} training images in {time.perf_counter() - t:.0f} s, device {cal.device}")
    for b, plans in cal.plans.items():
        print(f"  batch {b:>3}: " + "; ".join(f"{k} {v['plan']} (max|dx| {v['error']:.1e}, {v['seconds'] * 1e3:.0f} ms)"
                                              for k, v in plans.items()))
    print(f"  mean sweeps per block: {[{k: round(v, 1) for k, v in s.items() if k != 'sequential'} for s in cal.block_sweeps]}")
    print(f"wrote {save_calibration(cal, model_dir)}")


if __name__ == "__main__":
    main()
