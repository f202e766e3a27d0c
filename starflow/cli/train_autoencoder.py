"""``starflow train-autoencoder``: train a small KL autoencoder (diffusers AutoencoderKL) on a dataset,
compute its latent normalisation, report held-out reconstruction PSNR, and save a diffusers-format
directory (+ ``metrics.json`` and ``RECIPE.md`` recording the exact command)."""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import time

from starflow.cli.common import add_command, add_device_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = add_command(subparsers, name, "train a small KL autoencoder for latent flows", description=__doc__)
    p.add_argument("--dataset", default="mnist", help="mnist, digits, shapes or folder:PATH")
    p.add_argument("--out", required=True, help="output directory (diffusers format)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4,
                   help="weight of the posterior KL (summed over latent elements, divided by image elements)")
    p.add_argument("--recon-loss", default="l1+l2", choices=["l1", "l2", "l1+l2", "censored-l1", "censored-l1+l2"])
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--channels", default="32,64,64",
                   help="block_out_channels; k entries give 2^(k-1)x downsampling")
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--norm-groups", type=int, default=32)
    p.add_argument("--mid-attention", action="store_true", help="self-attention in the mid block")
    p.add_argument("--flip", action="store_true", help="random horizontal flips (not for digits)")
    p.add_argument("--image-size", type=int, default=None, help="folder datasets and shapes (default 32)")
    p.add_argument("--image-channels", type=int, default=3, help="folder datasets only")
    p.add_argument("--align-to", default=None, metavar="AUTOENCODER",
                   help="train in this autoencoder's latent space (shipped name or directory): the encoder "
                        "regresses its latents of the downsampled image, the decoder draws the full-size image "
                        "from them, so flows trained on its latents sample at this size")
    p.add_argument("--eval-sigma", type=float, default=0.3, help="also report PSNR with this latent noise")
    p.add_argument("--save-dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    add_device_arg(p)
    return p


def _command(args) -> str:
    parts = ["starflow", "train-autoencoder", "--dataset", args.dataset, "--out", args.out,
             "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--kl-weight", str(args.kl_weight), "--recon-loss", args.recon_loss,
             "--latent-channels", str(args.latent_channels), "--channels", args.channels,
             "--layers-per-block", str(args.layers_per_block), "--norm-groups", str(args.norm_groups),
             "--eval-sigma", str(args.eval_sigma), "--save-dtype", args.save_dtype, "--seed", str(args.seed)]
    if args.align_to:
        parts += ["--align-to", args.align_to]
    if args.mid_attention:
        parts.append("--mid-attention")
    if args.flip:
        parts.append("--flip")
    if args.image_size is not None:
        parts += ["--image-size", str(args.image_size), "--image-channels", str(args.image_channels)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def split_train_test(name: str, image_size, channels):
    """(train, test, labels): uint8 images of the named dataset's splits (a folder: 5% held out at random), and
    the splits' (train, test) class labels, each None where the dataset has none (folders, shapes)."""
    import torch

    from starflow.train.autoencoder_trainer import load_images  # lazy: sub-command help must not import torch

    if name.startswith("folder:"):
        imgs, _ = load_images(name, "train", image_size, channels)
        g = torch.Generator().manual_seed(0)
        perm = torch.randperm(len(imgs), generator=g)
        n_test = max(1, len(imgs) // 20)
        return imgs[perm[n_test:]], imgs[perm[:n_test]], (None, None)
    train, train_ds = load_images(name, "train", image_size, channels)
    test, test_ds = load_images(name, "test", image_size, channels)
    return train, test, (getattr(train_ds, "labels", None), getattr(test_ds, "labels", None))


def run(args) -> int:
    import torch

    # lazy: sub-command help must not import torch
    from starflow.components.autoencoder import Autoencoder, resolve_autoencoder
    # lazy: sub-command help must not import torch
    from starflow.train.autoencoder_trainer import (AutoencoderTrainConfig, config_to_dict, reconstruction_psnr,
                                                    train_autoencoder)

    apply_threads(args.threads)
    if args.steps < 1:
        raise ValueError("--steps must be >= 1")
    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise ValueError(f"--channels must be comma-separated integers, got {args.channels!r}") from None
    device = resolve_device(args.device)
    cfg = AutoencoderTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
                                 recon_loss=args.recon_loss, latent_channels=args.latent_channels,
                                 block_out_channels=channels, layers_per_block=args.layers_per_block,
                                 norm_num_groups=args.norm_groups, mid_attention=args.mid_attention,
                                 flip=args.flip, seed=args.seed)
    train, test, _ = split_train_test(args.dataset, args.image_size, args.image_channels)
    print(f"train-autoencoder: {args.dataset} train {tuple(train.shape)} test {tuple(test.shape)} on {device}, "
          f"{torch.get_num_threads()} threads")
    align_to = resolve_autoencoder(args.align_to, device=device) if args.align_to else None
    t0 = time.time()
    ae, hist = train_autoencoder(train, cfg, device=device, align_to=align_to)
    train_s = time.time() - t0
    ae.info = {"dataset": args.dataset, "image_size": int(train.shape[-1]), "command": _command(args)}
    if args.align_to:
        ae.info["aligned_to"] = {"autoencoder": args.align_to, "encoder_fingerprint": align_to.encoder_fingerprint(),
                                 "final_align_mse": hist["kl"][-1]}
    dtype = torch.float16 if args.save_dtype == "float16" else torch.float32
    ae.save_pretrained(args.out, dtype=dtype)
    # numbers are measured on the weights as stored (reloaded from disk)
    re = Autoencoder.from_pretrained(args.out, device=device)
    psnr = reconstruction_psnr(re, test)
    psnr_noisy = reconstruction_psnr(re, test, sigma=args.eval_sigma) if args.eval_sigma > 0 else None
    n_params = sum(p.numel() for p in re.vae.parameters())
    metrics = {"dataset": args.dataset, "test_images": len(test), "test_psnr_db": psnr,
               f"test_psnr_db_sigma{args.eval_sigma}": psnr_noisy, "train_seconds": train_s,
               "threads": torch.get_num_threads(), "device": str(device), "parameters": n_params,
               "scaling_factor": re.scaling_factor, "shift_factor": re.shift_factor,
               "latent_shape": list(re.latent_shape(int(train.shape[-1]))), "config": config_to_dict(cfg),
               "final_recon_loss": hist["recon"][-1],
               ("final_align_mse" if args.align_to else "final_kl_per_pixel"): hist["kl"][-1],
               "torch": torch.__version__, "python": platform.python_version()}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    _write_recipe(args, metrics, train, test)
    print(f"saved {args.out}: test PSNR {psnr:.2f} dB"
          + (f", with σ={args.eval_sigma} latent noise {psnr_noisy:.2f} dB" if psnr_noisy is not None else "")
          + f"; trained {train_s:.0f}s")
    return 0


def _write_recipe(args, m, train, test) -> None:
    import diffusers

    noisy = m.get(f"test_psnr_db_sigma{args.eval_sigma}")
    lines = [
        f"# Autoencoder `{os.path.basename(os.path.normpath(args.out))}`", "",
        "Made by (from the repository root):", "", "```", _command(args), "```", "",
        f"- data: `{args.dataset}` train split {tuple(train.shape)}, evaluated on the held-out test split "
        f"({len(test)} images)",
        f"- model: diffusers AutoencoderKL, block_out_channels={m['config']['block_out_channels']}, "
        f"layers_per_block={m['config']['layers_per_block']}, {m['parameters']:,} parameters, "
        f"latent {tuple(m['latent_shape'])}, weights stored as {args.save_dtype}",
        f"- latent normalisation: z = (mean_latent - {m['shift_factor']:.6g}) * {m['scaling_factor']:.6g} "
        + ("(the reference's, kept)" if args.align_to else "(1/std and mean over the train split)"),
        f"- test PSNR (decode(encode(x)), images in [0,1], mean over images): **{m['test_psnr_db']:.2f} dB**",
    ]
    if args.align_to:
        lines.append(f"- latent space: aligned to `{args.align_to}` (the encoder regresses its latents of the image "
                     f"area-downsampled to its size, final mean-squared error {m['final_align_mse']:.4f} in "
                     "normalised units; the decoder is trained on its latents)")
    if noisy is not None:
        lines.append(f"- test PSNR with σ={args.eval_sigma} Gaussian noise added to the normalised latent: "
                     f"{noisy:.2f} dB")
    lines += [f"- training time: {m['train_seconds']:.0f} s on {m['device']} with {m['threads']} thread(s) "
              f"(torch {m['torch']}, diffusers {diffusers.__version__})", ""]
    with open(os.path.join(args.out, "RECIPE.md"), "w") as f:
        f.write("\n".join(lines))
