"""Sampling speed: naive (recompute the prefix) vs cached sequential vs Jacobi, one run, one model.

    python benchmarks/sampling_speed.py                       # the shipped MNIST model
    python benchmarks/sampling_speed.py --checkpoint DIR --batch-sizes 1,8,32,64 --threads 2
    python benchmarks/sampling_speed.py --official-path PATH  # also time apple/ml-tarflow's sampler

Prints images/s, the speed-ups, the max difference of Jacobi samples from sequential ones, and the
achieved FLOP/s as a fraction of this machine's measured fp32 matmul peak. Figures are ratios within
one run; the machine is shared, so absolute numbers move between runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from flops import measure_matmul_peak, sampling_flops
from starflow.io.shipped import DEFAULT_DIGITS_MODEL
from starflow.pipeline import load_pretrained


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int) -> tuple[float, torch.Tensor]:
    fn()  # warm-up
    best, out = float("inf"), None
    for _ in range(repeats):
        _sync()
        t = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best, out


def official_sampler(path: str, model, batch: int, y, z):
    """Time apple/ml-tarflow's Model.reverse on the same config with our weights mapped back."""
    sys.path.insert(0, path)
    import transformer_flow  # noqa: F401  (the official module)

    c = model.config
    if c.cond_mode != "add" or c.cond_blocks != "all" or c.deep_layers is not None:
        return None, "official code only builds uniform stacks with additive classes; skipped for this model"
    off = transformer_flow.Model(in_channels=c.in_channels, img_size=c.image_size, patch_size=c.patch_size,
                                 channels=c.width, num_blocks=c.num_blocks, layers_per_block=c.layers_per_block,
                                 num_classes=c.num_classes).eval()
    tokens = model.patchify(z)

    def sample():
        with torch.no_grad():  # as the official scripts sample; with autograd on it is several times slower
            return off.reverse(tokens.clone(), y)
    return sample, None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_DIGITS_MODEL)
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--naive-max-batch", type=int, default=64, help="skip naive above this batch (it is slow)")
    p.add_argument("--jacobi-threshold", type=float, default=1e-3)
    p.add_argument("--jacobi-window", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--official-path", help="folder containing the official transformer_flow.py")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action="store_true", help="sample under bf16 autocast (GPU)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = load_pretrained(args.checkpoint, map_location=device).model
    c = model.config
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    peak = measure_matmul_peak(dtype=dtype, device=args.device, n=1024 if device.type == "cpu" else 8192)
    where = f"threads={args.threads}" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"model {args.checkpoint}: {model.num_params() / 1e6:.2f}M params, {c.num_tokens} tokens x {c.token_dim} dims, "
          f"blocks {c.block_layers()}; {where}; {'bf16' if args.bf16 else 'fp32'} matmul peak {peak / 1e9:.1f} GFLOP/s")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16)
    autocast.__enter__()
    rows = []
    header = f"{'batch':>5} {'naive img/s':>12} {'cached img/s':>13} {'jacobi img/s':>13} {'cached/naive':>13} {'jacobi/cached':>14} {'max|jac-seq|':>13} {'sweeps':>14} {'cached %peak':>13}"
    print(header)
    for B in [int(b) for b in args.batch_sizes.split(",")]:
        g = torch.Generator().manual_seed(0)
        z = torch.randn((B, *model.image_shape), generator=g).to(device)
        y = (torch.arange(B) % c.num_classes).to(device) if c.num_classes else None
        t_cached, x_seq = timed(lambda: model.inverse(z, y), args.repeats)
        t_jac, (x_jac, stats) = timed(lambda: model.inverse(z, y, sampler="jacobi", jacobi_threshold=args.jacobi_threshold,
                                                            jacobi_window=args.jacobi_window, return_stats=True),
                                      args.repeats)
        sweeps = stats.sweeps()
        t_naive = None
        if B <= args.naive_max_batch:
            t_naive, x_naive = timed(lambda: model.inverse(z, y, sampler="naive"), 1)
        flops = sampling_flops(c) * B
        row = dict(batch=B, naive=B / t_naive if t_naive else None, cached=B / t_cached, jacobi=B / t_jac,
                   max_diff=(x_jac - x_seq).abs().max().item(), sweeps=sweeps, cached_frac_peak=flops / t_cached / peak)
        if args.official_path:
            fn, why = official_sampler(args.official_path, model, B, y, z)
            row["official"] = (B / timed(fn, args.repeats)[0]) if fn else why
        rows.append(row)
        naive = f"{row['naive']:.1f}" if row["naive"] else "skipped"
        ratio = f"{row['cached'] / row['naive']:.1f}x" if row["naive"] else "-"
        print(f"{B:>5} {naive:>12} {row['cached']:>13.1f} {row['jacobi']:>13.1f} {ratio:>13} "
              f"{row['jacobi'] / row['cached']:>13.2f}x {row['max_diff']:>13.1e} {str(sweeps):>14} {100 * row['cached_frac_peak']:>12.1f}%")
        if "official" in row:
            print(f"      official TARFlow sampler: {row['official']}")
    if not args.official_path:
        print("official TARFlow sampler: skipped (pass --official-path to a checkout of apple/ml-tarflow)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"peak_flops": peak, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
