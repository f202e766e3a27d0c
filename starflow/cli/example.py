"""``starflow example``: write example inputs for ``encode``, ``nll --image`` and ``inpaint``.

The digit is a real held-out MNIST test image (28x28, white digit on black, as the MNIST models
expect); the mask has the same size, white = regenerate, black = keep.

  starflow example --digit 3 --out digit.png --mask lower-half --mask-out mask.png
  starflow inpaint --image digit.png --mask mask.png --class 3 --out inpainted.png
"""
from __future__ import annotations

from starflow.cli.common import add_command

MASKS = ("lower-half", "upper-half", "left-half", "right-half", "centre")


def add_parser(sub, name):
    p = add_command(sub, name, "write an example digit image (and an inpainting mask) to try encode/inpaint",
                    description=__doc__)
    p.add_argument("--digit", type=int, default=3, help="which digit, 0-9")
    p.add_argument("--index", type=int, default=0, help="which test image of that digit")
    p.add_argument("--out", default="digit.png", help="output PNG for the digit")
    p.add_argument("--mask", choices=MASKS, help="also write a mask covering this region (white = regenerate)")
    p.add_argument("--mask-out", default="mask.png", help="output PNG for the mask (with --mask)")
    return p


def mask_array(kind: str, size: int):
    """A uint8 [size, size] mask: 255 where the region should be regenerated."""
    import numpy as np

    m = np.zeros((size, size), dtype=np.uint8)
    half, q = size // 2, size // 4
    region = {"lower-half": (slice(half, None), slice(None)), "upper-half": (slice(None, half), slice(None)),
              "left-half": (slice(None), slice(None, half)), "right-half": (slice(None), slice(half, None)),
              "centre": (slice(q, size - q), slice(q, size - q))}[kind]
    m[region] = 255
    return m


def run(args) -> int:
    import os

    from PIL import Image

    from starflow.data.digits import load_mnist_subset  # lazy: sub-command help must not import torch

    if not 0 <= args.digit <= 9:
        raise ValueError(f"--digit must be 0-9, got {args.digit}")
    images, labels = load_mnist_subset("test")
    picks = images[labels == args.digit]
    if not 0 <= args.index < len(picks):
        raise ValueError(f"--index must be between 0 and {len(picks) - 1}, got {args.index}")
    for path in (args.out, args.mask_out if args.mask else None):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(picks[args.index], mode="L").save(args.out)
    print(f"wrote {args.out} (MNIST test digit {args.digit}, #{args.index}, 28x28, white on black)")
    if args.mask:
        Image.fromarray(mask_array(args.mask, picks.shape[-1]), mode="L").save(args.mask_out)
        print(f"wrote {args.mask_out} ({args.mask} mask, white = regenerate)")
    return 0
