"""Latent vs pixel space at equal CPU time: the STARFlow paper's claim at small scale.

    python benchmarks/latent_vs_pixel.py --minutes 8

Trains two class-conditional deep-shallow STARFlow models on the MNIST subset for the same wall-clock
budget each (steps calibrated from a short timing run, since their per-step cost differs):
  * pixel: 1x28x28 pixels, patch 4 (49 tokens x 16 dims), Gaussian noise 0.1 + Tweedie denoising;
  * latent: the shipped MNIST autoencoder's 4x7x7 latents, patch 1 (49 tokens x 4 dims), latent
    noise 0.3 + the decoder fine-tuned for it.
Same width, depth, batch, optimizer and schedule. Prints per model: parameters, steps reached, train
images/s, FD-EffNetLite0 of 500 samples vs the test split, classifier accuracy, and sampling ms/image.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from starflow.flow.config import FlowConfig
from starflow.train.config import TrainConfig
from starflow.train.recipe import RunConfig


def run_config(space: str, steps: int, out: str, width: int) -> RunConfig:
    common = dict(width=width, head_dim=32, num_blocks=4, layers_per_block=1, deep_layers=5, num_classes=10)
    train = dict(dataset="mnist", out_dir=out, steps=steps, batch_size=64, lr=1e-3, warmup_steps=min(100, steps // 10),
                 ema_decay=0.995, log_every=max(1, steps // 20), ckpt_every=steps, sample_every=steps)
    if space == "pixel":
        return RunConfig("starflow", FlowConfig(in_channels=1, image_size=28, patch_size=4, **common),
                         TrainConfig(noise_std=0.1, **train))
    return RunConfig("starflow", FlowConfig(in_channels=4, image_size=7, patch_size=1, **common),
                     TrainConfig(noise_std=0.3, autoencoder="mnist", decoder="mnist_ft", **train))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=8.0, help="training budget per model")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-eval", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/latent_vs_pixel")
    p.add_argument("--json", default="benchmarks/results/latent_vs_pixel.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from starflow.data import DigitsDataset
    from starflow.evaluation.classifier import conditional_accuracy
    from starflow.evaluation.features import get_extractor
    from starflow.evaluation.frechet import FeatureStats, compare_stats, reference_stats
    from starflow.io.images import to_uint8
    from starflow.train.build import build_trainer

    extractor = get_extractor("effnetlite0")
    ref, _ = reference_stats("mnist", "test", extractor, images=DigitsDataset("mnist", "test").images)
    labels = torch.arange(args.num_eval) % 10
    results = {}
    for space in ("pixel", "latent"):
        probe = build_trainer(run_config(space, 20, os.path.join(args.out, space + "_probe"), args.width))
        t0 = time.time()
        for s in range(20):
            probe.train_step(s)
        per_step = (time.time() - t0) / 20
        steps = max(20, int(args.minutes * 60 / per_step))
        trainer = build_trainer(run_config(space, steps, os.path.join(args.out, space), args.width))
        t0 = time.time()
        trainer.train()
        seconds = time.time() - t0
        pipe = trainer.pipeline(trainer.ema.module)
        t1 = time.time()
        images = torch.cat([pipe.sample(min(100, args.num_eval - i), y=labels[i:i + 100],
                                        generator=torch.Generator().manual_seed(i)) for i in range(0, args.num_eval, 100)])
        ms = 1000 * (time.time() - t1) / args.num_eval
        images = to_uint8(images)
        fd = compare_stats(FeatureStats.from_features(extractor.extract(images).numpy()), ref)["value"]
        acc = conditional_accuracy(images, labels)["accuracy"]
        results[space] = dict(params=trainer.model.num_params(), steps=steps, train_seconds=seconds,
                              train_images_per_s=steps * 64 / seconds, fd=fd, accuracy=acc, sample_ms_per_image=ms)
        print(space, json.dumps(results[space]), flush=True)
    print(f"\n{'space':<8}{'params':>9}{'steps':>7}{'train img/s':>12}{'FD':>8}{'acc':>7}{'ms/img':>8}")
    for k, r in results.items():
        print(f"{k:<8}{r['params'] / 1e6:>8.2f}M{r['steps']:>7}{r['train_images_per_s']:>12.1f}{r['fd']:>8.2f}"
              f"{r['accuracy']:>7.3f}{r['sample_ms_per_image']:>8.1f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
