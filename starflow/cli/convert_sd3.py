"""``starflow convert-sd3``: import a diffusers SD3Transformer2DModel folder as a rectified-flow model."""
from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def add_parser(sub, name):
    p = sub.add_parser(name, help="convert a diffusers SD3 / SD3.5 transformer (MM-DiT) folder")
    p.add_argument("folder", help="diffusers SD3Transformer2DModel folder (config.json + .safetensors), e.g. "
                                  "the transformer/ folder of an SD3 pipeline (its sibling scheduler/ gives the shift)")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--image-size", type=int, help="latent side to sample at (default: the model's sample_size)")
    p.add_argument("--shift", type=float, help="sampling/training shift (default: scheduler/ config, else 3.0)")
    p.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights")
    return p


def run(args) -> int:
    import torch

    from starflow.peers.convert import from_diffusers_sd3  # lazy: sub-command help must not import torch

    model = from_diffusers_sd3(args.folder, image_size=args.image_size, shift=args.shift)
    model.save_pretrained(args.out, dtype=getattr(torch, args.dtype))
    c = model.config
    print(f"converted {model.num_params() / 1e6:.2f}M parameters (depth {c.depth}, width {c.width}, "
          f"qk_norm {c.qk_norm}, dual attention {list(c.dual_attention_layers)}) -> {args.out}")
    return 0
