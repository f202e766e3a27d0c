"""Prove the CUDA path in one short run (used on a lent GPU; CI has none).

    python benchmarks/gpu_check.py --checkpoint starflow/assets/starflow_mnist_pixel

1. the shipped model on CUDA: forward/inverse round trip, cached = naive = Jacobi, NLL under bf16
   autocast close to fp32;
2. a few bf16-autocast training steps of a small model on scikit-learn digits (loss finite, falling);
3. training images/s on this GPU at batch 256 for the shipped recipe's architecture;
4. which attention kernels a training step launches (the unpadded ``is_causal=True`` path should take a
   flash or memory-efficient kernel, not the math fallback).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from starflow import STARFlow, TrainConfig
from starflow.flow.config import FlowConfig
from starflow.io.shipped import PIXEL_DIGITS_MODEL
from starflow.pipeline import load_pretrained


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=PIXEL_DIGITS_MODEL)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(dev)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    model = load_pretrained(args.checkpoint, map_location=dev).model
    c = model.config
    g = torch.Generator(dev).manual_seed(0)
    y = torch.arange(8, device=dev) % max(c.num_classes, 1) if c.num_classes else None
    # In-distribution inputs: a trained flow maps off-distribution inputs (e.g. uniform noise) to huge
    # z, and the float32 round trip of those is ill-conditioned on any device.
    x = model.sample(8, y=y, generator=g, device=dev)
    with torch.no_grad():
        z, logdet = model(x, y)
        print(f"[1] round trip max|inverse(forward(x)) - x| = {(model.inverse(z, y) - x).abs().max().item():.2e} (fp32, CUDA)")
        seq = model.inverse(z, y)
        naive = model.inverse(z, y, sampler="naive")
        jac = model.inverse(z, y, sampler="jacobi", jacobi_threshold=1e-6)
        print(f"    cached vs naive {(seq - naive).abs().max().item():.2e}, Jacobi vs cached {(jac - seq).abs().max().item():.2e}")
        nll32 = model.nll(x, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            nll16 = model.nll(x, y)
            s16 = model.sample(8, y=y, generator=g, guidance=2.0)
        print(f"    NLL fp32 {nll32.mean().item():.4f} vs bf16 autocast {nll16.mean().item():.4f} nats/dim; "
              f"bf16 guided samples finite: {torch.isfinite(s16).all().item()}")

    from starflow.data import DigitsDataset
    from starflow.train.trainer import Trainer

    torch.manual_seed(0)
    small = STARFlow(FlowConfig(image_size=8, patch_size=2, width=64, head_dim=32, num_blocks=3, layers_per_block=1,
                                deep_layers=2, num_classes=10))
    cfg = TrainConfig(dataset="digits", out_dir=tempfile.mkdtemp(), steps=60, batch_size=64, log_every=20,
                      ckpt_every=60, sample_every=60, warmup_steps=5, lr=2e-3, precision="bf16", device="cuda")
    t = Trainer(small, DigitsDataset("digits"), cfg)
    t.train()
    import json, os
    losses = [json.loads(l)["loss"] for l in open(os.path.join(cfg.out_dir, "log.jsonl")) if '"loss"' in l]
    print(f"[2] bf16 training on CUDA, losses at steps 20/40/60: {[round(v, 4) for v in losses]}")

    big = STARFlow(c).to(dev)
    opt = torch.optim.AdamW(big.parameters(), 1e-3)
    xb = torch.rand((256, *model.image_shape), device=dev) * 2 - 1
    yb = torch.arange(256, device=dev) % c.num_classes if c.num_classes else None
    for prec in ("fp32", "bf16"):
        for i in range(13):
            if i == 3:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                loss = big.loss(xb, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        torch.cuda.synchronize()
        print(f"[3] training {prec}: {256 * 10 / (time.perf_counter() - t0):.0f} images/s at batch 256 "
              f"({big.num_params() / 1e6:.2f}M params)")

    from torch.profiler import ProfilerActivity, profile

    for prec in ("fp32", "bf16"):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=prec == "bf16"):
                big.loss(xb, yb).backward()
            torch.cuda.synchronize()
        names = sorted({e.key for e in prof.key_averages() if any(k in e.key.lower() for k in ("flash", "attention", "fmha", "efficient", "softmax"))})
        print(f"[4] attention kernels of a training step ({prec}): {names or 'none matched'}")


if __name__ == "__main__":
    main()
