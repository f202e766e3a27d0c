"""``starflow decode``: a noise file written by ``starflow encode`` -> the image, through the exact inverse."""
from __future__ import annotations

from starflow.cli.common import add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(sub, name):
    p = add_command(sub, name, "decode a noise file from 'starflow encode' back to an image")
    p.add_argument("--noise", required=True, help=".safetensors file written by starflow encode")
    p.add_argument("--out", required=True, help="output PNG (a grid if the file holds several images)")
    add_model_arg(p, "the one recorded in the noise file")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    from starflow.io.shipped import resolve_model  # lazy: sub-command help must not import torch
    import os
    import sys

    from starflow.tasks import encode as E  # lazy: sub-command help must not import torch
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch

    apply_threads(args.threads)
    device = resolve_device(args.device)
    z, meta = E.load_noise(args.noise)
    model_dir = args.model or meta.get("model")
    if not model_dir:
        raise ValueError(f"{args.noise} does not record its model; pass --model")
    if args.model:
        model_dir = resolve_model(model_dir)
    else:  # a path read from a file: only a saved model folder, and say which one is used
        from starflow.errors import UnsafePathError  # lazy: sub-command help must not import torch

        if not os.path.isdir(model_dir):
            raise FileNotFoundError(f"model directory not found: {model_dir} (recorded in {args.noise}); pass --model")
        if not (os.path.isabs(model_dir) and any(os.path.isfile(os.path.join(model_dir, n))
                                                 for n in ("model_index.json", "config.json"))):
            raise UnsafePathError(f"{args.noise} names {model_dir!r}, which is not a saved model folder; pass --model")
        print(f"note: using the model recorded in {args.noise}: {model_dir}", file=sys.stderr)
    pipe = StarflowPipeline.from_pretrained(model_dir, device=device)
    shape = tuple(pipe.model.image_shape)
    if z.ndim != 4 or tuple(z.shape[1:]) != shape:
        raise ValueError(f"noise has shape {tuple(z.shape)} but this model's noise is [B, {', '.join(map(str, shape))}]")
    images = E.decode(pipe, z, y=meta.get("class"), prompt=meta.get("prompt"))
    E.save_image(images, args.out)
    print(f"decoded {images.shape[0]} image(s) {tuple(images.shape[1:])} -> wrote {args.out}")
    return 0
