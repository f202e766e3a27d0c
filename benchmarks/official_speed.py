"""Sampling speed against the official TARFlow sampler: one run, interleaved, the same weights.

    python benchmarks/official_speed.py --official-path PATH/ml-tarflow --threads 1
    python benchmarks/official_speed.py --models mnist --batch-sizes 1,8   # starflow samplers only
    python benchmarks/official_speed.py --official-path PATH/ml-tarflow --device cuda   # a GPU

Two models:
* ``tarflow``: a TARFlow stack built by the official code (``transformer_flow.Model``, read from
  ``--official-path``, never copied here), width ``--width`` (default 256), its random initialisation
  perturbed by N(0, ``--perturb``^2) on every weight (a fresh one is the identity map), converted with
  ``starflow.convert.tarflow``. Its calibration set is its own sequential samples, so the Jacobi
  samplers are checked on in-distribution samples of this model.
* ``mnist``: the shipped MNIST STARFlow (prefix class token, deep-shallow stack). The official code
  cannot build this layout, so it is timed for the starflow samplers only, against our sequential
  sampler; its stored calibration (if any) drives selective / segment / auto.

For every batch size every sampler is timed in turn, repeatedly (best of ``--repeats`` rounds, three
times as many below batch 32), so the machine's load hits all of them alike. max|dx| is against the
official output (tarflow) or our sequential output (mnist). Figures are ratios within this run; absolute numbers move with the load.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from starflow.convert.tarflow import from_tarflow
from starflow.flow.sampling import SAMPLERS
from starflow.flow.selective_jacobi import calibrate


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def tarflow_pair(path: str, width: int, blocks: int, layers: int, perturb: float, seed: int):
    """(official Model, our converted STARFlow) holding the same weights."""
    sys.path.insert(0, path)
    import transformer_flow  # the official module, from the user's checkout

    args = dict(in_channels=1, img_size=28, patch_size=4, channels=width, num_blocks=blocks,
                layers_per_block=layers, num_classes=10)
    torch.manual_seed(seed)
    off = transformer_flow.Model(**args)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in off.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * perturb)
    off.eval()
    ours = from_tarflow({k: v.clone() for k, v in off.state_dict().items()}, args).eval()
    return off, ours


def methods(model, official, guided: bool):
    """name -> fn(z_image, y) for every sampler (naive only where asked) and the official one."""
    g = dict(guidance=2.0, guidance_rule="tarflow") if guided else {}
    out = {}
    if official is not None:
        # Under no_grad, as the official scripts sample (inference_mode): with autograd on, Model.reverse
        # records a graph of every step and runs several times slower, which inflated this table once.
        def official_fn(z, y):
            with torch.no_grad():
                return official.reverse(model.patchify(z).clone(), y, guidance=g.get("guidance", 0.0), guide_what="ab")
        out["official"] = official_fn
    for name in SAMPLERS:
        out[name] = (lambda s: lambda z, y: model.inverse(z, y, sampler=s, return_stats=True, **g))(name)
    return out


def bench_model(label, model, official, batch_sizes, repeats, naive_max, guided_batches, rows, device="cpu"):
    c = model.config
    print(f"\n== {label}: {model.num_params() / 1e6:.2f}M params, width {c.width}, blocks {c.block_layers()}, "
          f"{c.num_tokens} tokens; calibration: {'stored' if getattr(model, 'sampling_calibration', None) else 'none'}")
    ref_name = "official" if official is not None else "sequential"
    print(f"{'batch':>5} {'guided':>6} {'sampler':>10} {'img/s':>8} {'vs ' + ref_name:>14} {'vs sequential':>13} "
          f"{'max|dx|':>9}  plan / sweeps" + ("  (both ratios are vs sequential here)" if official is None else ""))
    cases = [(B, False) for B in batch_sizes] + [(B, True) for B in guided_batches]
    for B, guided in cases:
        g = torch.Generator().manual_seed(B)
        z = torch.randn((B, *model.image_shape), generator=g).to(device)
        y = (torch.arange(B) % c.num_classes).to(device)
        fns = methods(model, official, guided)
        if B > naive_max:
            fns.pop("naive")
        best, outs = {k: float("inf") for k in fns}, {}
        rounds = repeats if B >= 32 else 3 * repeats  # small batches are quick and the noisiest
        for r in range(rounds + 1):  # round 0 warms up every method
            for name, fn in fns.items():
                _sync()
                t = time.perf_counter()
                outs[name] = fn(z, y)
                _sync()
                if r:
                    best[name] = min(best[name], time.perf_counter() - t)
        ref = outs[ref_name]
        ref = ref[0] if isinstance(ref, tuple) else ref
        for name in fns:
            o = outs[name]
            x, stats = o if isinstance(o, tuple) else (o, None)
            row = dict(model=label, device=str(device), batch=B, guided=guided, sampler=name, images_per_s=B / best[name],
                       vs_ref=best[ref_name] / best[name], vs_sequential=best["sequential"] / best[name],
                       max_dx=(x - ref).abs().max().item(),
                       plan=stats.plan if stats else None, sweeps=stats.iterations if stats else None)
            rows.append(row)
            extra = f"{row['plan']} {row['sweeps']}" if stats and name not in ("sequential", "naive") else ""
            print(f"{B:>5} {'w=2' if guided else '-':>6} {name:>10} {row['images_per_s']:>8.1f} {row['vs_ref']:>13.2f}x "
                  f"{row['vs_sequential']:>12.2f}x {row['max_dx']:>9.1e}  {extra}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official-path", help="folder holding the official transformer_flow.py (apple/ml-tarflow)")
    p.add_argument("--models", default="tarflow,mnist")
    p.add_argument("--batch-sizes", default="1,8,32,64")
    p.add_argument("--guided-batch-sizes", default="1", help="guidance w=2 (tarflow rule) at these batch sizes")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--naive-max-batch", type=int, default=1)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--perturb", type=float, default=0.01)
    p.add_argument("--calibration-images", type=int, default=64)
    p.add_argument("--calibration-batch-sizes", default="1,32", help="auto uses the nearest calibrated batch")
    p.add_argument("--mnist", default=None, help="MNIST model directory (default: the shipped one)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda: both samplers and the official one run there")
    p.add_argument("--json", help="also write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    guided = [int(b) for b in args.guided_batch_sizes.split(",") if b]
    rows, notes = [], {}
    dev = torch.device(args.device)
    print(f"threads={args.threads}, torch {torch.__version__}, device {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    if "tarflow" in args.models:
        if not args.official_path:
            print("tarflow: skipped (pass --official-path to a checkout of apple/ml-tarflow)")
        else:
            off, ours = tarflow_pair(args.official_path, args.width, args.blocks, args.layers, args.perturb, 0)
            off, ours = off.to(dev), ours.to(dev)
            # Calibration set: the model's own samples (in distribution for this model by construction).
            g = torch.Generator(dev).manual_seed(123)
            n = args.calibration_images
            y = (torch.arange(n) % 10).to(dev)
            t = time.perf_counter()
            images = torch.cat([ours.sample(min(64, n - s), y=y[s:s + 64], generator=g, device=dev) for s in range(0, n, 64)])
            cal_batches = [int(b) for b in args.calibration_batch_sizes.split(",")]
            ours.sampling_calibration = calibrate(ours, images, batches=cal_batches, repeats=1, y=y)
            notes["tarflow_calibration_s"] = time.perf_counter() - t
            notes["tarflow_calibration"] = {b: {k: v["plan"] for k, v in p_.items()} for b, p_ in ours.sampling_calibration.plans.items()}
            print(f"tarflow calibration ({n} own samples, {notes['tarflow_calibration_s']:.0f} s): {notes['tarflow_calibration']}")
            bench_model(f"tarflow (official code, width {args.width}, perturb {args.perturb})", ours, off, batches,
                        args.repeats, args.naive_max_batch, guided, rows, dev)
    if "mnist" in args.models:
        from starflow.io.shipped import PIXEL_DIGITS_MODEL
        from starflow.pipeline import load_pretrained

        model = load_pretrained(args.mnist or PIXEL_DIGITS_MODEL, map_location=dev).model.eval()
        print("mnist: the official code cannot build a prefix-conditioned deep-shallow stack; starflow samplers only")
        bench_model("shipped MNIST STARFlow", model, None, batches, args.repeats, args.naive_max_batch, guided, rows, dev)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "notes": notes, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
