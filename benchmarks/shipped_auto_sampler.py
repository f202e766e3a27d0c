"""`--sampler auto` against the cached sequential sampler on the shipped models, batch 1, end to end.

Each shipped model carries a sampling calibration (`model/sampling_calibration.json`, made by
`benchmarks/calibrate_sampling.py --checkpoint NAME`); `auto` runs the fastest plan that met the
calibrated tolerance for this device and batch. This times whole `pipeline.sample` calls (prompt
encoding, flow, denoising, decoder) at the model's stored defaults, interleaved, same seeds, and prints
the largest difference between the two samplers' images.

    python benchmarks/shipped_auto_sampler.py --threads 1 --repeats 10
"""
from __future__ import annotations

import argparse
import time

import torch

from starflow.pipeline import StarflowPipeline

CONDITIONS = {"mnist": dict(y=torch.tensor([3])), "shapes": dict(prompt=["a red circle"])}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mnist,shapes")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per sampler (after 2 warm-up rounds)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        pipe = StarflowPipeline.from_pretrained(name)
        d = pipe.sampling_defaults
        times, diff = {"sequential": [], "auto": []}, 0.0
        for r in range(args.repeats + 2):
            outs = {}
            for s in ("sequential", "auto") if r % 2 == 0 else ("auto", "sequential"):
                t0 = time.perf_counter()
                with torch.no_grad():
                    outs[s] = pipe.sample(1, generator=torch.Generator().manual_seed(r), sampler=s,
                                          guidance=d["guidance"], temperature=d["temperature"], **CONDITIONS[name])
                if r >= 2:
                    times[s].append(time.perf_counter() - t0)
            diff = max(diff, (outs["auto"] - outs["sequential"]).abs().max().item())
        med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
        print(f"{name}: batch 1 at its defaults (w {d['guidance']:g}, T {d['temperature']:g}), median of "
              f"{args.repeats} interleaved calls: sequential {med['sequential'] * 1e3:.0f} ms, auto "
              f"{med['auto'] * 1e3:.0f} ms, speed-up {med['sequential'] / med['auto']:.2f}x; "
              f"max |image difference| {diff:.1e} (images in [-1, 1])")


if __name__ == "__main__":
    main()
