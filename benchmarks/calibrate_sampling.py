"""Calibrate the selective / segment / auto samplers of a model on its training data, and store the
calibration next to the model's weights.

    python benchmarks/calibrate_sampling.py                       # the shipped pixel MNIST model, 256 images
    python benchmarks/calibrate_sampling.py --checkpoint mnist    # the shipped latent MNIST model
    python benchmarks/calibrate_sampling.py --checkpoint shapes   # text-to-image: train scenes + their captions
    python benchmarks/calibrate_sampling.py --checkpoint DIR --dataset mnist --images 256 --threads 1

The calibration set is what the flow was trained on: training images (dequantised for pixel models,
encoded to latents for latent models), plus Gaussian noise of the model's training ``noise_std``, with
their classes or captions as the condition. Timings are this device's; ``auto`` on another device falls
back to the sequential sampler until it is calibrated there. The stored file keeps the calibrations of
other devices (calibrate once on the CPU and once on a GPU, and ``auto`` uses the right one on each).
"""
from __future__ import annotations

import argparse
import os
import time

import torch

from starflow.flow.selective_jacobi import (calibrate, calibration_list, load_calibration, merge_calibrations,
                                            save_calibration)
from starflow.io.images import dequantize
from starflow.io.shipped import PIXEL_DIGITS_MODEL, resolve_model
from starflow.pipeline import StarflowPipeline
from starflow.tasks import encode as E


def calibration_set(pipe, dataset: str, n: int, noise_std: float, g: torch.Generator):
    """(model-space inputs as in training, condition kwargs) for ``n`` training examples."""
    if dataset == "shapes":
        from starflow.data.shapes import ShapesDataset

        ds = ShapesDataset("train", size=n, image_size=pipe.image_shape[-1])
        images, cond = ds.images(), dict(prompt=ds.captions)
    else:
        from starflow.data import DigitsDataset

        ds = DigitsDataset(dataset, "train")
        images, labels = ds.get_batch(torch.randperm(len(ds), generator=g)[:n])
        cond = dict(y=labels)
    labels, text = E.condition_args(pipe, len(images), **cond)
    x = E.to_model_space(pipe, images) if pipe.autoencoder is not None else dequantize(images, generator=g)
    x = x + noise_std * torch.randn(x.shape, generator=g).to(x.device)
    return x, {"y": labels} if labels is not None else {"text": text}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=PIXEL_DIGITS_MODEL, help="shipped name, pipeline or model directory")
    p.add_argument("--dataset", default=None, choices=["mnist", "digits", "shapes"],
                   help="training data (default: shapes for text-to-image models, else mnist)")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--noise-std", type=float, default=None,
                   help="the training noise augmentation (default: the model's own noise_std)")
    p.add_argument("--tolerance", type=float, default=1e-3)
    p.add_argument("--threshold", type=float, default=1e-3)
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.checkpoint)
    pipe = StarflowPipeline.from_pretrained(path)
    model = pipe.model.eval()
    model_dir = os.path.join(path, "model") if os.path.isdir(os.path.join(path, "model")) else path
    dataset = args.dataset or ("shapes" if pipe.text_encoder is not None else "mnist")
    noise_std = pipe.noise_std if args.noise_std is None else args.noise_std
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        x, cond = calibration_set(pipe, dataset, args.images, noise_std, g)
    t = time.perf_counter()
    cal = calibrate(model, x, tolerance=args.tolerance, threshold=args.threshold,
                    batches=tuple(int(b) for b in args.batch_sizes.split(",")), **cond)
    print(f"calibrated on {len(x)} {dataset} training examples (noise_std {noise_std}) in "
          f"{time.perf_counter() - t:.0f} s, device {cal.device}")
    for b, plans in cal.plans.items():
        print(f"  batch {b:>3}: " + "; ".join(f"{k} {v['plan']} (max|dx| {v['error']:.1e}, {v['seconds'] * 1e3:.0f} ms)"
                                              for k, v in plans.items()))
    print(f"  mean sweeps per block: {[{k: round(v, 1) for k, v in s.items() if k != 'sequential'} for s in cal.block_sweeps]}")
    stored = merge_calibrations(load_calibration(model_dir), cal)
    devices = [c.device for c in calibration_list(stored)]
    print(f"wrote {save_calibration(stored, model_dir)} (devices: {', '.join(devices)})")


if __name__ == "__main__":
    main()
