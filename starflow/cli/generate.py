"""``starflow generate``: the main job. ``--prompt`` gives images from the shipped text-to-image model
(shapes); ``--class`` gives digits from the shipped class-conditional MNIST model. Sampling settings
default to the model's own (stored in its model_index.json)."""
from __future__ import annotations

import os
import time

from starflow.cli.common import add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads, resolve_device
from starflow.cli.sample import add_decoding_args, add_sampling_args, add_scale_arg, sampling_kwargs

MAX_IMAGES = 256
EPILOG = """examples:
  starflow generate --prompt "two red circles above a blue square"
  starflow generate --class 3 -n 16 --out threes.png
  starflow generate --model DIR --prompt "a green triangle"

Without --model, one of --prompt or --class is required. With a class-conditional --model and neither,
the images cycle through the classes; with an unconditional model, neither is needed."""


def add_parser(sub, name):
    p = add_command(sub, name, "generate images from a prompt (or a class) with a shipped or saved model",
                    description=__doc__ + "\n\n" + EPILOG)
    p.add_argument("--prompt", help="text prompt, e.g. 'two red circles above a blue square'")
    p.add_argument("--class", dest="label", type=int, help="class label (class-conditional models, e.g. digits 0-9)")
    add_model_arg(p, "shapes with --prompt, mnist with --class")
    p.add_argument("--out", default="out.png", help="PNG path (a grid), or a folder with --no-grid")
    p.add_argument("--no-grid", dest="grid", action="store_false", help="one PNG per image into --out")
    p.add_argument("--grid", dest="grid", action="store_true", help="one PNG grid (the default)")
    add_scale_arg(p)
    add_decoding_args(p)
    add_sampling_args(p)
    p.set_defaults(num_images=4, grid=True)
    add_device_arg(p)
    add_threads_arg(p)
    return p


def default_model(prompt: str | None) -> str:
    """The shipped model for a prompt (shapes) or a class (mnist)."""
    return "shapes" if prompt is not None else "mnist"


def run(args) -> int:
    import torch

    from starflow.io.images import save_images  # lazy: sub-command help must not import torch
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch

    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("empty prompt")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if args.prompt is not None and args.label is not None:
        raise ValueError("give --prompt or --class, not both")
    if args.model is None and args.prompt is None and args.label is None:
        raise ValueError("give --prompt TEXT (shipped shapes model) or --class N (shipped MNIST digits model), "
                         "or --model to choose a model")
    apply_threads(args.threads)
    from starflow.errors import check_output_dir  # lazy: sub-command help must not import torch

    check_output_dir(args.out if not args.grid else os.path.dirname(os.path.abspath(args.out)), "--out")
    device = resolve_device(args.device)
    pipe = StarflowPipeline.from_pretrained(args.model or default_model(args.prompt), device=device, denoise=args.denoise,
                                           decoder=args.decoder)
    kw = sampling_kwargs(args, pipe)
    y = None
    if args.label is not None:
        y = torch.full((args.num_images,), args.label, dtype=torch.long)
    elif args.prompt is None and pipe.num_classes:
        y = torch.arange(args.num_images) % pipe.num_classes
    if args.prompt is None and pipe.is_text_conditional:
        raise ValueError("this model is text-conditional; pass --prompt")
    t0 = time.time()
    images = pipe.sample(args.num_images, y=y, prompt=args.prompt, generator=torch.Generator(device).manual_seed(args.seed),
                         device=device, **kw)
    dt = time.time() - t0
    paths = save_images(images, args.out, grid=args.grid, scale=args.scale)
    where = f"wrote {paths[0]}" if args.grid else f"wrote {len(paths)} files in {args.out}"
    print(f"{args.num_images} images in {dt:.2f}s (w={args.guidance:g}, T={args.temperature:g}, {args.sampler}) -> {where}")
    return 0
