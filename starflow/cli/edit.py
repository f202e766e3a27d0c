"""``starflow edit``: edit an image by an instruction ("make the circle blue", "remove the square",
"add a red triangle", "move the triangle to the left") with an edit model (see ``starflow.tasks.editing``)."""
from __future__ import annotations

from starflow.cli.common import add_command, add_device_arg, add_model_arg, add_threads_arg, apply_threads, resolve_device

MAX_IMAGES = 64


def add_parser(sub, name):
    from starflow.io.shipped import sampling_help  # lazy: sub-command help must not import torch

    p = add_command(sub, name, "edit an image by a text instruction (shapes world)", description=__doc__)
    p.add_argument("--image", required=True, help="PNG/JPEG file")
    p.add_argument("--instruction", required=True, help="e.g. 'make the circle blue', 'remove the square', "
                                                        "'add a red triangle', 'move the triangle to the left'")
    p.add_argument("--out", default="edited.png", help="output PNG (a grid with --num-images > 1)")
    add_model_arg(p, "edit")
    p.add_argument("--num-images", "-n", type=int, default=1, help="edits to draw")
    p.add_argument("--guidance", type=float, help="guidance weight w >= 0 on the instruction "
                                                   f"(default: {sampling_help('guidance', 0.0, ('edit',))})")
    p.add_argument("--temperature", type=float, help=f"noise scale T (default: {sampling_help('temperature', 1.0, ('edit',))})")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--check", action="store_true",
                   help="report the change ShapesEval's detector sees between the input and each output")
    add_device_arg(p)
    add_threads_arg(p)
    return p


def run(args) -> int:
    import warnings

    import torch

    from starflow.tasks import encode as E  # lazy: sub-command help must not import torch
    from starflow.io.shipped import resolve_model  # lazy: sub-command help must not import torch
    # lazy: sub-command help must not import torch
    from starflow.tasks.editing import EditPipeline, infer_edit, parse_instruction

    apply_threads(args.threads)
    if not args.instruction.strip():
        raise ValueError("empty instruction")
    if not 1 <= args.num_images <= MAX_IMAGES:
        raise ValueError(f"--num-images must be between 1 and {MAX_IMAGES}, got {args.num_images}")
    try:
        model_dir = resolve_model(args.model or "edit")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"edit model not found: {e}") from None
    device = resolve_device(args.device)
    with E.notes():
        try:
            parse_instruction(args.instruction)
        except ValueError as e:
            warnings.warn(f"the instruction is outside the grammar the edit model was trained on, results are "
                          f"unreliable ({e})", UserWarning)
        pipe = EditPipeline.from_pretrained(model_dir, device=device)
        C, H, _ = pipe.image_shape
        image = E.load_image(args.image, C, H)
    n = args.num_images
    out = pipe.edit(image[None].expand(n, -1, -1, -1), [args.instruction] * n, guidance=args.guidance,
                    temperature=args.temperature, generator=torch.Generator(device).manual_seed(args.seed))
    E.save_image(out, args.out)
    print(f"{n} edit(s) of {args.image} ({args.instruction!r}) -> wrote {args.out}")
    if args.check:
        for i, img in enumerate(out):
            got = infer_edit(image, img)
            print(f"  [{i}] detected change: {got.text if got else 'none / not a single supported edit'}")
    return 0
