"""Training throughput on this machine: fp32 vs bf16 autocast, eager vs torch.compile, thread counts.

Times full training steps (forward, backward, AdamW) of the flow of a recipe (default: the latent MNIST
recipe) on a fixed batch, the modes interleaved in one run (this machine is shared: compare ratios),
and reports images/s, the ratio to fp32 eager, the achieved FLOP/s as a fraction of the matmul peak
measured in the same run (fp32 and bf16), and how far each mode's loss moves from fp32 on the same
batch (the flow keeps its affine arithmetic and log-determinant in fp32 under autocast).

    python benchmarks/train_efficiency.py --threads 1 --steps 5 --repeats 3
    python benchmarks/train_efficiency.py --threads 1 --modes fp32,bf16,fp32-compile,bf16-compile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flops import forward_flops, measure_matmul_peak  # noqa: E402

from starflow.train.recipe import load_run_config  # noqa: E402
from starflow.models import model_class  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_step(model, opt, x, y, bf16: bool, compiled: bool):
    loss_fn = torch.compile(model.loss) if compiled else model.loss

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(x, y=y)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mnist_latent.yaml")
    p.add_argument("--modes", default="fp32,bf16,fp32-compile")
    p.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    p.add_argument("--steps", type=int, default=5, help="timed steps per mode and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "train_efficiency_cpu.json"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run = load_run_config(os.path.join(ROOT, a.config))
    cfg = run.model
    batch = a.batch_size or run.train.batch_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    y = torch.randint(0, max(1, cfg.num_classes), (batch,), generator=g) if cfg.num_classes else None
    peaks = {"fp32": measure_matmul_peak(dtype=torch.float32), "bf16": measure_matmul_peak(dtype=torch.bfloat16)}
    flops_per_step = 3 * forward_flops(cfg) * batch

    steps, ref_loss, losses = {}, None, {}
    for mode in a.modes.split(","):
        torch.manual_seed(0)
        model = model_class(run.model_type)(cfg)
        with torch.no_grad():  # off the identity (zero-initialised outputs), the same weights in every mode
            gen = torch.Generator().manual_seed(1)
            for param in model.parameters():
                param.add_(0.02 * torch.randn(param.shape, generator=gen))
        opt = torch.optim.AdamW(model.parameters(), lr=run.train.lr)
        steps[mode] = make_step(model, opt, x, y, bf16=mode.startswith("bf16"), compiled=mode.endswith("compile"))
        t = time.perf_counter()
        losses[mode] = steps[mode]()  # first step: same weights in every mode; compiles if asked
        print(f"{mode}: first step {time.perf_counter() - t:.1f} s, loss {losses[mode]:.6f}", flush=True)
        ref_loss = losses[mode] if ref_loss is None else ref_loss
    times = {m: [] for m in steps}
    for _ in range(a.repeats):
        for mode, step in steps.items():  # interleaved: the machine's load hits every mode alike
            t = time.perf_counter()
            for _ in range(a.steps):
                step()
            times[mode].append((time.perf_counter() - t) / a.steps)
    base = statistics.median(times[next(iter(times))])
    rows = []
    for mode, ts in times.items():
        sec = statistics.median(ts)
        peak = peaks["bf16" if mode.startswith("bf16") else "fp32"]
        rows.append({"mode": mode, "s_per_step": sec, "images_per_s": batch / sec, "speedup": base / sec,
                     "flop_fraction_of_peak": flops_per_step / sec / peak,
                     "first_loss_minus_fp32": losses[mode] - ref_loss})
    print(f"recipe {a.config}: batch {batch}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, "
          f"{a.threads} thread(s); matmul peak fp32 {peaks['fp32'] / 1e9:.1f}, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    print("mode | s/step | images/s | vs first mode | FLOP/s / peak | loss - fp32 loss (step 1)")
    for r in rows:
        print(f"{r['mode']} | {r['s_per_step']:.3f} | {r['images_per_s']:.1f} | {r['speedup']:.2f}x | "
              f"{r['flop_fraction_of_peak']:.1%} | {r['first_loss_minus_fp32']:+.2e}")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"config": a.config, "batch": batch, "threads": a.threads, "peaks_flops": peaks,
                   "flops_per_step": flops_per_step, "rows": rows}, f, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
