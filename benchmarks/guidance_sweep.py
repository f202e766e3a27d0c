"""Guidance sweep: FD-EffNetLite0 and conditional accuracy per guidance weight, for each rule.

    python benchmarks/guidance_sweep.py                          # shipped MNIST model, 500 samples per w
    python benchmarks/guidance_sweep.py --num-samples 1000 --weights 0,1,3 --rules starflow

The small-scale version of STARFlow's Fig. 10b: the paper claims its rule reaches a best FID no worse
than TARFlow's and stays stable over a much wider range of w. Every configuration samples from the
same noise (same seed), so differences come from the rule alone. FD is computed against the MNIST
test split (500 images) at equal n; the "real" row is the FD of held-out real images (train split, n
images) against the same reference: the value a perfect model would get at this n.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from safetensors.torch import load_file, save_file

from starflow.io.images import to_uint8
from starflow.io.shipped import DEFAULT_DIGITS_MODEL
from starflow.pipeline import load_pretrained

RULES = ("starflow", "tarflow", "tarflow-annealed")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_DIGITS_MODEL)
    p.add_argument("--weights", default="0,0.5,1,2,3,5,8,12")
    p.add_argument("--rules", default=",".join(RULES))
    p.add_argument("--num-samples", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default="benchmarks/results/guidance_sweep.json")
    p.add_argument("--device", default="cpu")
    p.add_argument("--save-samples", help="only sample (e.g. on a GPU) and save uint8 images to this .safetensors")
    p.add_argument("--from-samples", help="score images saved by --save-samples instead of sampling")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [float(w) for w in args.weights.split(",")]
    rules = args.rules.split(",")
    if args.save_samples:
        save_samples(args, weights, rules)
        return

    from starflow.data import DigitsDataset
    from starflow.evaluation.classifier import conditional_accuracy, load_mnist_classifier
    from starflow.evaluation.features import get_extractor
    from starflow.evaluation.frechet import FeatureStats, compare_stats, reference_stats

    pipe = load_pretrained(args.checkpoint, map_location=args.device)
    n, k = args.num_samples, pipe.num_classes
    if not k:
        raise SystemExit("the guidance sweep needs a class-conditional model")
    labels = torch.arange(n) % k
    extractor = get_extractor("effnetlite0")
    clf = load_mnist_classifier()
    test = DigitsDataset("mnist", "test")
    ref, _ = reference_stats("mnist", "test", extractor, images=test.images)
    train = DigitsDataset("mnist", "train")
    real = FeatureStats.from_features(extractor.extract(train.images[torch.randperm(len(train), generator=torch.Generator().manual_seed(1))[:n]]).numpy())
    real_fd = compare_stats(real, ref)["value"]
    print(f"model {args.checkpoint}; n={n} samples per configuration ({n // k} per class); FD-EffNetLite0 vs "
          f"mnist/test (n={ref.n}); held-out real images at the same n: FD {real_fd:.2f}")
    stored = load_file(args.from_samples) if args.from_samples else None
    rows = []
    print(f"{'rule':<18}{'w':>6}{'FD':>9}{'acc':>8}{'s':>7}")
    for rule in rules:
        for w in weights:
            t0 = time.time()
            if stored is not None:
                images, finite = stored[f"{rule}/{w:g}"], bool(stored[f"{rule}/{w:g}/finite"].item())
            else:
                images, finite = generate(pipe, labels, rule, w, args.batch_size, args.device)
            feats = extractor.extract(images).numpy()
            fd = compare_stats(FeatureStats.from_features(feats), ref)["value"]
            acc = conditional_accuracy(images, labels, clf)["accuracy"]
            rows.append(dict(rule=rule, w=w, fd=fd, accuracy=acc, finite=finite, seconds=time.time() - t0))
            print(f"{rule:<18}{w:>6g}{fd:>9.2f}{acc:>8.3f}{time.time() - t0:>7.0f}" + ("" if finite else "  non-finite!"))
    best = {r: min((x for x in rows if x["rule"] == r), key=lambda x: x["fd"]) for r in rules}
    for r, b in best.items():
        print(f"best FD {r}: {b['fd']:.2f} at w={b['w']:g} (accuracy {b['accuracy']:.3f})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"checkpoint": args.checkpoint, "n": n, "real_fd": real_fd, "rows": rows,
                       "sampled_on": "file " + args.from_samples if args.from_samples else args.device}, f, indent=1)


def generate(pipe, labels, rule, w, batch_size, device):
    """uint8 samples for one (rule, w), from the same noise for every configuration."""
    chunks = []
    for i in range(0, len(labels), batch_size):
        y = labels[i:i + batch_size].to(device)
        g = torch.Generator(device).manual_seed(1000 + i)
        chunks.append(pipe.sample(len(y), y=y, generator=g, device=device, guidance=w, guidance_rule=rule).cpu())
    x = torch.cat(chunks)
    return to_uint8(x), bool(torch.isfinite(x).all())


def save_samples(args, weights, rules):
    pipe = load_pretrained(args.checkpoint, map_location=args.device)
    labels = torch.arange(args.num_samples) % pipe.num_classes
    out = {}
    for rule in rules:
        for w in weights:
            t0 = time.time()
            out[f"{rule}/{w:g}"], finite = generate(pipe, labels, rule, w, args.batch_size, args.device)
            out[f"{rule}/{w:g}/finite"] = torch.tensor(finite)
            print(f"sampled {rule} w={w:g}: {args.num_samples} images in {time.time() - t0:.1f}s", flush=True)
    save_file(out, args.save_samples)


if __name__ == "__main__":
    main()
