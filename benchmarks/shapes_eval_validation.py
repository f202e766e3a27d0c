"""Validate the ShapesEval scorer on scenes whose truth is known.

Prints, for test-split scenes rendered by ``starflow.data.shapes.render_spec``:

1. accuracy on ground-truth images per category (should be ~1: the scorer must pass correct images),
   at 32x32 and 64x64;
2. rejection rate on corrupted scenes (same caption, scene changed so the caption is false: wrong colour,
   wrong count, swapped position, swapped colour binding, wrong shape), per category and corruption;
3. accuracy on ground truth degraded by Gaussian blur and additive noise, the way a generative model's
   samples are imperfect, to show how far the scorer's tolerance goes.

Usage: python benchmarks/shapes_eval_validation.py [--per-category 500] [--out FILE]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections import Counter

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from starflow.data.shapes import CATEGORIES, ShapesDataset, render_spec  # noqa: E402
from starflow.evaluation.shapes_eval import (  # noqa: E402
    CORRUPTIONS,
    corrupt_spec,
    degrade,
    evaluate,
    format_table,
    score,
    spec_satisfies_claim,
)

DEGRADATIONS = [(0.5, 0.02), (0.5, 0.03), (0.8, 0.03), (1.0, 0.05), (1.3, 0.05)]


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-category", type=int, default=500)
    ap.add_argument("--out", default=None, help="also write the report to this file")
    args = ap.parse_args(argv)
    if args.per_category < 1:
        ap.error("--per-category must be >= 1")

    lines: list[str] = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    t_start = time.time()
    n = args.per_category
    specs = ShapesDataset("test", size=n * len(CATEGORIES)).specs
    say(f"ShapesEval validation: {n} test-split scenes per category ({len(specs)} in all)")
    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs (shared) | python {platform.python_version()} "
        f"| numpy {np.__version__}")
    say(f"command: python benchmarks/shapes_eval_validation.py --per-category {n}")
    assert all(spec_satisfies_claim(s) for s in specs)

    for size in (32, 64):
        t0 = time.time()
        table = evaluate([render_spec(s, size) for s in specs], specs)
        dt = time.time() - t0
        say()
        say(format_table(table, title=f"[1] ground truth, {size}x{size}  ({dt / len(specs) * 1e3:.1f} ms/image)"))

    say()
    say("[2] rejection of corrupted scenes, 32x32 (caption unchanged, scene made false)")
    rng = np.random.default_rng(12345)
    rejected, total = Counter(), Counter()
    for spec in specs:
        for kind in CORRUPTIONS[spec.category]:
            bad = corrupt_spec(spec, kind, rng)
            total[spec.category, kind] += 1
            rejected[spec.category, kind] += not score(render_spec(bad, 32), bad)["passed"]
    say(f"{'category':<15}{'corruption':<12}{'n':>6}{'rejected':>10}")
    for cat in CATEGORIES:
        for kind in CORRUPTIONS[cat]:
            k = (cat, kind)
            say(f"{cat:<15}{kind:<12}{total[k]:>6}{rejected[k] / total[k]:>10.3f}")
    by_kind = Counter()
    by_kind_n = Counter()
    for (cat, kind), v in total.items():
        by_kind[kind] += rejected[cat, kind]
        by_kind_n[kind] += v
    say("by corruption: " + ", ".join(f"{k} {by_kind[k] / by_kind_n[k]:.3f} (n={by_kind_n[k]})" for k in by_kind_n))
    say(f"all corrupted: {sum(rejected.values()) / sum(total.values()):.3f} (n={sum(total.values())})")
    rng, rng_d = np.random.default_rng(54321), np.random.default_rng(8)
    rej_d = tot_d = 0
    for spec in specs:
        for kind in CORRUPTIONS[spec.category]:
            bad = corrupt_spec(spec, kind, rng)
            img = degrade(render_spec(bad, 32), blur_sigma=1.0, noise_std=0.05, rng=rng_d)
            tot_d += 1
            rej_d += not score(img, bad)["passed"]
    say(f"all corrupted, then blurred (sigma 1.0) + noise (0.05): {rej_d / tot_d:.3f} (n={tot_d})")

    say()
    say("[3] ground truth degraded (Gaussian blur sigma px, additive Gaussian noise std as fraction of 255)")
    hdr = f"{'size':<6}{'blur':>6}{'noise':>7}" + "".join(f"{c[:13]:>15}" for c in CATEGORIES) + f"{'overall':>9}"
    say(hdr)
    for size in (32, 64):
        for blur, noise in DEGRADATIONS:
            rng = np.random.default_rng(7)
            b = blur * size / 32  # same blur relative to the objects
            images = [degrade(render_spec(s, size), blur_sigma=b, noise_std=noise, rng=rng) for s in specs]
            table = evaluate(images, specs)
            say(f"{size:<6}{b:>6.2f}{noise:>7.2f}" + "".join(
                f"{table['categories'][c]['accuracy']:>15.3f}" for c in CATEGORIES) + f"{table['overall']:>9.3f}")

    say()
    say("[3b] photometric changes of ground truth, 32x32 (dimmer objects, a grey-lifted background)")
    base = [render_spec(s, 32).astype(np.float64) for s in specs]
    for name, f in [("objects 0.7x as bright", lambda x: 0.7 * x),
                    ("background lifted by 40/255", lambda x: x + 40.0 * (1 - x / 255.0)),
                    ("0.7x + blur 0.8 + noise 0.03", None)]:
        if f is None:
            rng = np.random.default_rng(3)
            images = [degrade(np.clip(np.rint(0.7 * x), 0, 255).astype(np.uint8), 0.8, 0.03, rng) for x in base]
        else:
            images = [np.clip(np.rint(f(x)), 0, 255).astype(np.uint8) for x in base]
        table = evaluate(images, specs)
        say(f"{name:<30}" + "  ".join(f"{c} {v['accuracy']:.3f}" for c, v in table["categories"].items())
            + f"  | overall {table['overall']:.3f}")

    say()
    say("[4] chance level: each image scored against the caption of a random other scene of its category")
    rng = np.random.default_rng(99)
    by_cat = {c: [s for s in specs if s.category == c] for c in CATEGORIES}
    others = []
    for s in specs:
        pool = by_cat[s.category]
        j = int(rng.integers(len(pool) - 1)) if len(pool) > 1 else 0
        others.append([p for p in pool if p is not s][j] if len(pool) > 1 else s)
    table = evaluate([render_spec(s, 32) for s in specs], others)
    say(format_table(table, title="(a model that draws a random scene of the right category, ignoring the rest of the prompt, scores about this)"))

    say()
    say(f"total time {time.time() - t_start:.1f} s")
    report = "\n".join(lines) + "\n"
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(report)
    return report


if __name__ == "__main__":
    main()
