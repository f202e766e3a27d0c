"""The one-token decoder's matmul kernel: F.linear vs weights packed once for oneDNN (``PackedLinear``).

    python benchmarks/decode_kernels.py --threads 1
    python benchmarks/decode_kernels.py --checkpoint DIR --batch-sizes 1,8,32,64

Two tables, both interleaved within one run (the machine is shared; read the ratios):
1. one matmul per shape of a width-``--width`` layer (qkv, proj, MLP up/down), rows 1..64;
2. the whole cached sequential inverse of a model (default: a TARFlow-layout stack of width 256,
   4 blocks x 2 layers, 49 tokens, perturbed random weights; or ``--checkpoint``), packed vs plain,
   with the max |dx| between the two.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import starflow.nn.packed_linear as P
from starflow import FlowConfig, STARFlow
from starflow.pipeline import load_pretrained


def best_of(fns: dict, rounds: int, inner: int = 1) -> dict:
    """Best wall time per call of each fn, the fns taking turns in every round."""
    best = {k: float("inf") for k in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(inner):
                fn()
            if r:
                best[name] = min(best[name], (time.perf_counter() - t) / inner)
    return best


def matmul_table(width: int, rows_list, rounds: int):
    shapes = {"qkv": (width, 3 * width), "proj": (width, width), "mlp up": (width, 4 * width),
              "mlp down": (4 * width, width)}
    print(f"\n1. one matmul, width {width}: microseconds per call (plain F.linear / packed), ratio")
    print(f"{'rows':>5} " + " ".join(f"{n:>24}" for n in shapes) + f" {'all four':>10}")
    for rows in rows_list:
        cells, tot = [], {"plain": 0.0, "packed": 0.0}
        for name, (k, n) in shapes.items():
            layer, x = nn.Linear(k, n), torch.randn(rows, k)
            with torch.no_grad():  # every shape packed, whatever the thresholds say: this table sets them
                packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight, rows)
                b = best_of({"plain": lambda: F.linear(x, layer.weight, layer.bias),
                             "packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")},
                            rounds, inner=50)
            tot = {k_: tot[k_] + b[k_] for k_ in tot}
            cells.append(f"{b['plain'] * 1e6:8.1f} /{b['packed'] * 1e6:8.1f} {b['plain'] / b['packed']:4.2f}x")
        print(f"{rows:>5} " + " ".join(f"{c:>24}" for c in cells) + f" {tot['plain'] / tot['packed']:>9.2f}x")


def inverse_table(model, batch_sizes, rounds: int):
    print(f"\n2. cached sequential inverse, {model.num_params() / 1e6:.2f}M params, width {model.config.width}, "
          f"{model.config.num_tokens} tokens: images/s")
    print(f"{'batch':>5} {'plain':>9} {'packed':>9} {'packed/plain':>13} {'max|dx|':>9}")
    c = model.config
    for B in batch_sizes:
        z = torch.randn((B, *model.image_shape), generator=torch.Generator().manual_seed(B))
        y = torch.arange(B) % c.num_classes if c.num_classes else None
        outs = {}

        def run(min_rows, key):
            P.MIN_PACKED_ROWS = min_rows
            outs[key] = model.inverse(z, y, sampler="sequential")

        with torch.no_grad():
            b = best_of({"plain": lambda: run(10**9, "plain"), "packed": lambda: run(default_min, "packed")},
                        rounds if B >= 32 else 3 * rounds)
        dx = (outs["plain"] - outs["packed"]).abs().max().item()
        print(f"{B:>5} {B / b['plain']:>9.1f} {B / b['packed']:>9.1f} {b['plain'] / b['packed']:>12.2f}x {dx:>9.1e}",
              flush=True)
    P.MIN_PACKED_ROWS = default_min


default_min = P.MIN_PACKED_ROWS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="model folder or shipped name (default: a random TARFlow-layout stack)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--rows", default="1,2,4,8,16,32,64")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"threads={args.threads}, torch {torch.__version__}, oneDNN linear: {P._onednn_linear_available()}, "
          f"packing from {P.MIN_PACKED_ROWS} rows "
          f"and {P.MIN_PACKED_WEIGHT} weight entries")
    matmul_table(args.width, [int(r) for r in args.rows.split(",")], args.rounds)
    if args.checkpoint:
        model = load_pretrained(args.checkpoint).model
    else:
        torch.manual_seed(0)
        model = STARFlow(FlowConfig(in_channels=1, image_size=28, patch_size=4, width=args.width, head_dim=64,
                                    num_blocks=4, layers_per_block=2, num_classes=10))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for q in model.parameters():
                q.add_(torch.randn(q.shape, generator=g) * 0.01)
    inverse_table(model.eval(), [int(b) for b in args.batch_sizes.split(",")], args.rounds)


if __name__ == "__main__":
    main()
