"""``starflow nll``: exact negative log-likelihood (bits/dim for pixel models) on a data split."""
from __future__ import annotations

from starflow.cli.common import (add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads,
                                 model_spec, resolve_device)


def add_parser(sub, name):
    p = add_command(sub, name, "evaluate exact bits/dim on a dataset split")
    add_model_arg(p, "mnist", positional=True)
    p.add_argument("--dataset", default="mnist", help="dataset to score (a name starflow.data.build_dataset knows)")
    p.add_argument("--split", default="test", help="dataset split (test = held out)")
    p.add_argument("--batch-size", type=int, default=250, help="images per forward pass")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    p.add_argument("--out", help="also write the per-image figures' summary (mean, CI, quantiles) as JSON here")
    p.add_argument("--image", help="one image file: print its exact bits/dim (pixel models) or nats/dim of its "
                                   "latents (latent models), under the null condition (an out-of-distribution score)")
    p.add_argument("--bits-map", help="with --image (pixel models): also write where its bits go, a PNG of each "
                                      "pixel's bits (white = the most), enlarged")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    import torch

    from starflow.data import build_dataset  # lazy: sub-command help must not import torch
    from starflow.pipeline import load_pretrained  # lazy: sub-command help must not import torch

    apply_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.bits_map and not args.image:
        raise ValueError("--bits-map maps one image: give it with --image")
    if args.image:
        return _one_image(args, device)
    model = load_pretrained(model_spec(args) or "mnist", map_location=device)
    from starflow.protocols import LikelihoodModel  # lazy: sub-command help must not import torch

    if not isinstance(model.model, LikelihoodModel):  # model is a pipeline, which always has bits_per_dim
        raise ValueError(f"{type(model).__name__} has no exact likelihood")
    ds = build_dataset(args.dataset, args.split)
    generator = torch.Generator(device).manual_seed(args.seed)
    values = []
    with torch.no_grad():
        for i in range(0, len(ds), args.batch_size):
            idx = torch.arange(i, min(i + args.batch_size, len(ds)))
            x, y = ds.get_batch(idx) if hasattr(ds, "get_batch") else map(torch.stack, zip(*[ds[int(j)] for j in idx]))
            y = y.to(device) if model.config.num_classes else None
            values.append(model.bits_per_dim(x.to(device), y, generator=generator).cpu())
    bpd = torch.cat(values).double()
    from starflow.evaluation.likelihood import spread_summary  # lazy: sub-command help must not import torch

    summary = spread_summary(bpd)
    print(f"{args.dataset}/{args.split}: {summary['mean']:.4f} ± {summary['ci95']:.4f} bits/dim (95% CI, n={len(bpd)})")
    # A mean over images hides a heavy tail (a few odd digits can score 10x the median): show the spread.
    print("  median {median:.4f}, p90 {p90:.4f}, p99 {p99:.4f}, max {max:.4f}; mean without the top 1%: "
          "{mean_without_top1pct:.4f}".format(**summary))
    if n_inf := int(torch.isinf(bpd).sum()):
        print(f"  {n_inf} of {len(bpd)} images scored +inf: the flow maps them beyond float range")
    if args.out:
        import json

        from starflow.io.hub import atomic_write_bytes  # lazy: sub-command help must not import torch

        report = {"model": model_spec(args) or "mnist", "dataset": args.dataset, "split": args.split,
                  "seed": args.seed, "unit": "bits/dim", **summary}
        atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
        print(f"wrote {args.out}")
    return 0


def _one_image(args, device) -> int:
    import torch

    from starflow.tasks import encode as E  # lazy: sub-command help must not import torch
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch

    pipe = StarflowPipeline.from_pretrained(model_spec(args) or "mnist", device=device)
    if args.bits_map and pipe.autoencoder is not None:
        raise ValueError("--bits-map needs a pixel-space model; a latent model's dimensions are latents, not pixels")
    C, H, _ = pipe.image_shape
    with E.notes():
        image = E.load_image(args.image, C, H)
    value, unit = E.image_nll(pipe, image, generator=torch.Generator(device).manual_seed(args.seed))
    print(f"{args.image}: {value[0].item():.4f} {unit}")
    if args.bits_map:
        from starflow.io.images import auto_scale, make_grid, save_pil  # lazy: sub-command help must not import torch

        bits = E.image_bits_map(pipe, image, generator=torch.Generator(device).manual_seed(args.seed))[0]
        gray = (bits.clamp_min(0) / bits.max().clamp_min(1e-6) * 255).round().to(torch.uint8)
        save_pil(make_grid(gray[None], pad=0, scale=auto_scale(*gray.shape[-2:])), args.bits_map)
        print(f"wrote {args.bits_map}: {bits.min().item():.2f} to {bits.max().item():.2f} bits per pixel (black: 0 or "
              f"less, white: the most), mean {bits.mean().item():.4f}")
    return 0
