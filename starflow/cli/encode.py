"""``starflow encode``: an image file -> its exact noise under the flow (safetensors), with the round-trip
error and the image's exact likelihood. ``starflow decode`` inverts it."""
from __future__ import annotations

from starflow.cli.common import add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(sub, name):
    p = add_command(sub, name, "encode an image to its exact noise (safetensors); invert with 'starflow decode'",
                    description=__doc__ + "\n\nAn example input: starflow example --digit 3 --out digit.png")
    p.add_argument("--image", required=True, help="PNG/JPEG file (converted to the model's mode and size, with a "
                                                  "note); MNIST models expect a white digit on black")
    p.add_argument("--out", required=True, help="output .safetensors file (tensor 'noise' + metadata)")
    add_model_arg(p, "mnist, or shapes with --prompt")
    p.add_argument("--class", dest="label", type=int, help="class label to encode under (class-conditional models; "
                                                           "default: the null condition)")
    p.add_argument("--prompt", help="prompt to encode under (text-conditional models; default: the null condition)")
    p.add_argument("--seed", type=int, default=0, help="seed of the dequantisation noise for bits/dim")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    import os

    import torch

    from starflow.cli.generate import default_model  # lazy: sub-command help must not import torch
    from starflow.io.shipped import resolve_model  # lazy: sub-command help must not import torch
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch
    from starflow.tasks import encode as E  # lazy: sub-command help must not import torch

    apply_threads(args.threads)

    from starflow.errors import check_output_dir  # lazy: sub-command help must not import torch

    check_output_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
    device = resolve_device(args.device)
    # the resolved absolute path goes into the noise file, so decode finds the model from any folder
    model_dir = os.path.abspath(resolve_model(args.model or default_model(args.prompt)))
    pipe = StarflowPipeline.from_pretrained(model_dir, device=device)
    C, H, _ = pipe.image_shape
    with E.notes():
        image = E.load_image(args.image, C, H)
    y = args.label
    z = E.encode(pipe, image, y=y, prompt=args.prompt)
    err = E.round_trip_error(pipe, image, y=y, prompt=args.prompt)
    nll, unit = E.image_nll(pipe, image, y=y, prompt=args.prompt, generator=torch.Generator(device).manual_seed(args.seed))
    E.save_noise(args.out, z, model_dir, y=y, prompt=args.prompt, image=args.image, space=E.space(pipe))
    msg = f"noise {list(z.shape)} -> {args.out}\nround trip: max |error| {err['model_space']:.2e} in model space " \
          f"({E.space(pipe)}), {err['pixels']} pixel levels after decoding"
    if "reconstruction" in err:
        msg += f" (autoencoder reconstruction alone: {err['reconstruction']} levels)"
    print(msg)
    print(f"exact NLL: {nll[0].item():.4f} {unit}")
    print(f"wrote {args.out}")
    return 0
