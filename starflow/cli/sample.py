"""``starflow sample``: draw images from a saved model (default: the shipped digits model)."""
from __future__ import annotations

import argparse
import os
import time

from starflow.cli.common import (add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads,
                                 model_spec, resolve_device)
from starflow.flow.samplers import SAMPLERS

# Options whose default comes from the model (model_index.json "sampling"), else from the library.
MODEL_DEFAULTED = ("guidance", "temperature", "sampler", "guidance_rule")

# Images sampled (and written) at a time, so peak memory does not grow with -n. Small on CPU, where a
# bigger batch buys little speed; larger on accelerators, where it keeps the device busy.
SAMPLE_CHUNK = {"cpu": 64}
SAMPLE_CHUNK_ACCELERATOR = 256
MAX_IMAGES = 100_000


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    from starflow.io.shipped import sampling_help  # lazy: sub-command help must not import torch

    p.add_argument("--num-images", "-n", type=int, default=16, help="how many images")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--temperature", type=float, help=f"noise scale T (default: {sampling_help('temperature', 1.0)})")
    p.add_argument("--guidance", type=float, help="guidance weight w >= 0, 0 = unguided "
                                                   f"(default: {sampling_help('guidance', 0.0)})")
    p.add_argument("--guidance-rule", choices=["starflow", "tarflow", "tarflow-annealed"],
                   help=f"how guidance mixes the conditional and unconditional flows "
                        f"(default: {sampling_help('guidance_rule', 'starflow')})")
    p.add_argument("--sampler", choices=[*SAMPLERS, "diffusers"],
                   help="sequential: one token at a time (fastest on a CPU); jacobi: parallel fixed-point "
                        "iterations; selective/segment/auto: per-block plans from the model's stored calibration; diffusers: rectified-flow models only, the loop run by "
                        "diffusers' FlowMatchEulerDiscreteScheduler "
                        f"(default: {sampling_help('sampler', 'sequential')})")
    p.add_argument("--jacobi-threshold", type=float, default=1e-3, help="Jacobi convergence threshold")
    p.add_argument("--jacobi-window", type=int, default=0, help="tokens per Jacobi window (0 = whole block)")
    p.add_argument("--aspect", help="W:H, e.g. 16:9: sample at the model's aspect-ratio bucket nearest this ratio")


def add_decoding_args(p: argparse.ArgumentParser) -> None:
    """How a latent model's noisy sample becomes an image: the cleaning step and the decoder."""
    p.add_argument("--denoise", choices=["decoder", "tweedie", "none"],
                   help="latent models: how to clean the noisy latent (default: what the model was shipped with)")
    p.add_argument("--decoder", metavar="NAME|DIR",
                   help="latent models: decode with this autoencoder of the same latent space instead of the "
                        "shipped one (e.g. mnist, a clean decoder, with --denoise tweedie)")


def add_scale_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=int, default=0,
                   help="upscale each tile by this integer factor (nearest); 0 = automatic (tiles under 64 px "
                        "are enlarged), 1 = as sampled")


def add_parser(sub, name):
    p = add_command(sub, name, "sample images from a saved model")
    add_model_arg(p, "mnist", positional=True)
    p.add_argument("--class", dest="label", type=int, help="class label for every image (class-conditional "
                                                           "models; default: one of each class in turn)")
    p.add_argument("--out", default="samples.png", help="PNG grid path, or a folder with --no-grid")
    p.add_argument("--no-grid", action="store_true", help="write one PNG per image into --out")
    add_scale_arg(p)
    add_sampling_args(p)
    add_decoding_args(p)
    add_device_arg(p)
    add_threads_arg(p)
    return p


def sampling_kwargs(args, pipe) -> dict:
    """The sampler arguments the loaded model takes (peers: Euler sampling, guidance only). Options the
    user left unset take the model's own defaults (``pipe.sampling_defaults``); ``args`` is filled in."""
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    defaults = getattr(pipe, "sampling_defaults", None)
    if defaults is None:
        from starflow.pipeline import SAMPLING_DEFAULTS as defaults  # lazy: sub-command help must not import torch
    for key in MODEL_DEFAULTED:
        if getattr(args, key) is None:
            setattr(args, key, defaults[key])
    model_type = getattr(pipe.model, "model_type", "starflow")
    if args.sampler == "diffusers" and model_type != "rectified-flow":
        raise ValueError("--sampler diffusers is for rectified-flow models")
    if model_type != "starflow":
        if args.aspect or args.sampler not in ("sequential", "diffusers"):
            raise ValueError(f"{model_type} models take neither --aspect nor a flow --sampler ({args.sampler})")
        return {"guidance": args.guidance, **({"sampler": "diffusers"} if args.sampler == "diffusers" else {})}
    kw = dict(temperature=args.temperature, guidance=args.guidance, guidance_rule=args.guidance_rule, sampler=args.sampler)
    if args.sampler in ("jacobi", "chunked-jacobi"):
        kw.update(jacobi_threshold=args.jacobi_threshold, jacobi_window=args.jacobi_window)
    elif args.sampler in ("selective", "segment"):  # auto uses the calibrated threshold
        kw.update(jacobi_threshold=args.jacobi_threshold)
    if args.aspect:
        from starflow.data.buckets import nearest_bucket, parse_aspect  # lazy: sub-command help must not import torch

        kw["size"] = nearest_bucket(pipe.model.config.image_sizes(), parse_aspect(args.aspect))
    return kw


def run(args) -> int:
    import torch

    from starflow.errors import check_output_dir  # lazy: sub-command help must not import torch
    # lazy: sub-command help must not import torch
    from starflow.io.images import check_finite_images, save_images, to_uint8
    from starflow.pipeline import load_pretrained  # lazy: sub-command help must not import torch

    apply_threads(args.threads)
    check_output_dir(args.out if args.no_grid else os.path.dirname(os.path.abspath(args.out)), "--out")
    device = resolve_device(args.device)
    model = load_pretrained(model_spec(args) or "mnist", map_location=device, denoise=args.denoise,
                            decoder=args.decoder)
    kw = sampling_kwargs(args, model)
    y = None
    if args.label is not None:
        y = torch.full((args.num_images,), args.label, dtype=torch.long)
    elif model.num_classes:
        y = torch.arange(args.num_images) % model.num_classes
    generator = torch.Generator(device).manual_seed(args.seed)
    t0 = time.time()
    # Chunks keep memory flat in n: each chunk is sampled, checked and either written (one file per
    # image) or kept as uint8 for the grid. n <= the chunk size (the default 16 too) is one chunk, as before.
    kept, written = [], 0
    chunk_size = SAMPLE_CHUNK.get(device.type, SAMPLE_CHUNK_ACCELERATOR)
    for lo in range(0, args.num_images, chunk_size):
        k = min(chunk_size, args.num_images - lo)
        chunk = model.sample(k, y=None if y is None else y[lo:lo + k], generator=generator, device=device, **kw)
        check_finite_images(chunk, f"sampled images {lo}..{lo + k - 1}")
        if args.no_grid:
            written += len(save_images(chunk, args.out, grid=False, start=lo))
        else:
            kept.append(to_uint8(chunk).cpu())
        del chunk
    dt = time.time() - t0
    paths = save_images(torch.cat(kept), args.out, scale=args.scale) if kept else [args.out] * written
    print(f"{args.num_images} images in {dt:.2f}s ({args.num_images / dt:.1f} images/s) -> "
          f"{paths[0] if len(paths) == 1 else args.out}")
    return 0
