"""``starflow sample``: draw images from a saved model (default: the shipped digits model)."""
from __future__ import annotations

import argparse
import time

from starflow.cli.common import add_device_arg, add_threads_arg, apply_threads, resolve_device
from starflow.flow.sampling import SAMPLERS


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-images", "-n", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w >= 0 (0 = unguided)")
    p.add_argument("--guidance-rule", default="starflow", choices=["starflow", "tarflow", "tarflow-annealed"])
    p.add_argument("--sampler", default="sequential", choices=SAMPLERS)
    p.add_argument("--jacobi-threshold", type=float, default=1e-3)
    p.add_argument("--jacobi-window", type=int, default=0, help="tokens per Jacobi window (0 = whole block)")
    p.add_argument("--aspect", help="W:H, e.g. 16:9: sample at the model's aspect-ratio bucket nearest this ratio")


def add_parser(sub, name):
    p = sub.add_parser(name, help="sample images from a saved model")
    p.add_argument("checkpoint", nargs="?", help="model directory (default: the shipped MNIST model)")
    p.add_argument("--class", dest="label", type=int, help="class label for every image (class-conditional models)")
    p.add_argument("--out", default="samples.png", help="PNG grid path, or a folder with --no-grid")
    p.add_argument("--no-grid", action="store_true", help="write one PNG per image into --out")
    add_sampling_args(p)
    add_device_arg(p)
    add_threads_arg(p)
    return p


def sampling_kwargs(args, pipe) -> dict:
    """The sampler arguments the loaded model takes (peers: Euler sampling, guidance only)."""
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    if getattr(pipe.model, "model_type", "starflow") != "starflow":
        if args.aspect or args.sampler != "sequential":
            raise ValueError(f"{pipe.model.model_type} models take neither --aspect nor --sampler")
        return {"guidance": args.guidance}
    kw = dict(temperature=args.temperature, guidance=args.guidance, guidance_rule=args.guidance_rule, sampler=args.sampler)
    if args.sampler == "jacobi":
        kw.update(jacobi_threshold=args.jacobi_threshold, jacobi_window=args.jacobi_window)
    elif args.sampler in ("selective", "segment"):  # auto uses the calibrated threshold
        kw.update(jacobi_threshold=args.jacobi_threshold)
    if args.aspect:
        from starflow.data.buckets import nearest_bucket, parse_aspect

        kw["size"] = nearest_bucket(pipe.model.config.image_sizes(), parse_aspect(args.aspect))
    return kw


def run(args) -> int:
    import torch

    from starflow.io.images import save_images
    from starflow.models import DEFAULT_DIGITS_MODEL
    from starflow.pipeline import load_pretrained

    apply_threads(args.threads)
    device = resolve_device(args.device)
    model = load_pretrained(args.checkpoint or DEFAULT_DIGITS_MODEL, map_location=device)
    kw = sampling_kwargs(args, model)
    y = None
    if args.label is not None:
        y = torch.full((args.num_images,), args.label, dtype=torch.long)
    elif model.num_classes:
        y = torch.arange(args.num_images) % model.num_classes
    generator = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    images = model.sample(args.num_images, y=y, generator=generator, device=device, **kw)
    dt = time.time() - t0
    paths = save_images(images, args.out, grid=not args.no_grid)
    print(f"{args.num_images} images in {dt:.2f}s ({args.num_images / dt:.1f} images/s) -> "
          f"{paths[0] if len(paths) == 1 else args.out}")
    return 0
