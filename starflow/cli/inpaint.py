"""``starflow inpaint``: regenerate the white part of a mask, keeping the rest of the image
(training-free, iterative resampling through the exact inverse; see ``starflow.tasks.inpaint``)."""
from __future__ import annotations

from starflow.cli.common import add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads, resolve_device

MAX_IMAGES = 64


def add_parser(sub, name):
    p = add_command(sub, name, "inpaint the white region of a mask (optionally guided by a class or a prompt)",
                    description=__doc__ + "\n\nExample inputs: starflow example --digit 3 --out digit.png "
                                          "--mask lower-half --mask-out mask.png")
    p.add_argument("--image", required=True, help="PNG/JPEG file (MNIST models: a white digit on black)")
    p.add_argument("--mask", required=True, help="mask PNG of the same size: white = regenerate, black = keep "
                                                 "(thresholded at 0.5)")
    p.add_argument("--prompt", help="text prompt (text-conditional models)")
    p.add_argument("--class", dest="label", type=int, help="class label (class-conditional models)")
    p.add_argument("--out", default="inpainted.png", help="output PNG (a grid with --num-images > 1)")
    add_model_arg(p, "mnist, or shapes with --prompt")
    p.add_argument("--num-images", "-n", type=int, default=1, help="completions to draw")
    p.add_argument("--steps", type=int, default=5, help="resampling rounds")
    p.add_argument("--guidance", type=float, default=0.0, help="guidance weight w >= 0 of the condition")
    p.add_argument("--temperature", type=float, default=1.0, help="noise scale T")
    p.add_argument("--dilate", type=int, default=0, help="grow the latent mask by this many cells (latent models)")
    p.add_argument("--blend", default="paste", choices=["paste", "decoded"],
                   help="paste: unmasked pixels copied from the input (default); decoded: the decoder's image")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    import torch

    from starflow.tasks import encode as E  # lazy: sub-command help must not import torch
    from starflow.cli.generate import default_model  # lazy: sub-command help must not import torch
    from starflow.tasks.inpaint import inpaint, load_mask  # lazy: sub-command help must not import torch
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch

    apply_threads(args.threads)
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    if args.prompt is not None and args.label is not None:
        raise ValueError("give --prompt or --class, not both")
    device = resolve_device(args.device)
    pipe = StarflowPipeline.from_pretrained(args.model or default_model(args.prompt), device=device)
    C, H, _ = pipe.image_shape
    with E.notes():
        mask = load_mask(args.mask, args.image, H)
        image = E.load_image(args.image, C, H)
        n = args.num_images
        result = inpaint(pipe, image[None].expand(n, -1, -1, -1), mask, y=args.label, prompt=args.prompt,
                         steps=args.steps, guidance=args.guidance, temperature=args.temperature,
                         generator=torch.Generator(device).manual_seed(args.seed), blend=args.blend, dilate=args.dilate)
    E.save_image(result.images, args.out)
    frac = mask.float().mean().item()
    print(f"{n} completion(s), {frac:.1%} of pixels masked, {int(result.token_mask[0].sum())}/"
          f"{result.token_mask.shape[1]} tokens resampled, {args.steps} rounds -> wrote {args.out}")
    return 0
