"""``starflow nll``: exact negative log-likelihood (bits/dim for pixel models) on a data split."""
from __future__ import annotations

import math

from starflow.cli.common import add_device_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(sub, name):
    p = sub.add_parser(name, help="evaluate exact bits/dim on a dataset split")
    p.add_argument("checkpoint", nargs="?", help="model directory (default: the shipped MNIST model)")
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise")
    p.add_argument("--image", help="one image file: print its exact bits/dim (pixel models) or nats/dim of its "
                                   "latents (latent models), under the null condition (an out-of-distribution score)")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    import torch

    from starflow.data import build_dataset
    from starflow.models import DEFAULT_DIGITS_MODEL
    from starflow.pipeline import load_pretrained

    apply_threads(args.threads)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device)
    if args.image:
        return _one_image(args, device)
    model = load_pretrained(args.checkpoint or DEFAULT_DIGITS_MODEL, map_location=device)
    if not hasattr(model, "bits_per_dim"):
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
    half = 1.96 * bpd.std().item() / math.sqrt(len(bpd))
    print(f"{args.dataset}/{args.split}: {bpd.mean().item():.4f} ± {half:.4f} bits/dim (95% CI, n={len(bpd)})")
    return 0


def _one_image(args, device) -> int:
    import torch

    from starflow.tasks import encode as E
    from starflow.models import DEFAULT_DIGITS_MODEL
    from starflow.pipeline import StarflowPipeline

    pipe = StarflowPipeline.from_pretrained(args.checkpoint or DEFAULT_DIGITS_MODEL, device=device)
    C, H, _ = pipe.image_shape
    with E.notes():
        image = E.load_image(args.image, C, H)
    value, unit = E.image_nll(pipe, image, generator=torch.Generator(device).manual_seed(args.seed))
    print(f"{args.image}: {value[0].item():.4f} {unit}")
    return 0
