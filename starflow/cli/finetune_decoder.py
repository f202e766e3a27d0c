"""``starflow finetune-decoder``: fine-tune only the decoder of an autoencoder to map noisy latents
z + σε back to the image (STARFlow's way of cleaning a noisy flow sample), or, with ``--clean-with
MODEL``, to map those latents after MODEL's own Tweedie step back to the image (what MODEL's pipeline
decodes when it samples with ``denoise: tweedie``). Writes a full autoencoder directory whose encoder
weights are bit-identical to the original's (checked after saving), plus ``metrics.json`` and ``RECIPE.md``."""
from __future__ import annotations

import argparse
import json
import os
import shlex
import time

from starflow.cli.common import add_command, add_device_arg, add_threads_arg, apply_threads, resolve_device


def add_parser(subparsers, name: str) -> argparse.ArgumentParser:
    p = add_command(subparsers, name, "fine-tune an autoencoder's decoder on noisy latents", description=__doc__)
    p.add_argument("--autoencoder", required=True,
                   help="autoencoder directory (diffusers format) or a shipped name (mnist, shapes)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--sigma", type=float, default=None,
                   help="latent noise std (normalised latent units; default 0.3, or the --clean-with flow's own)")
    p.add_argument("--dataset", default=None, help="default: the dataset recorded with the autoencoder")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--recon-loss", default="l1+l2", choices=["l1", "l2", "l1+l2", "censored-l1", "censored-l1+l2"],
                   help="censored-*: a target pixel at pure black/white counts any prediction beyond it as exact, "
                        "so the decoder stops drawing a faint halo on black backgrounds (default: l1+l2)")
    p.add_argument("--flip", action="store_true", help="also train on flipped images (not for digits)")
    p.add_argument("--image-size", type=int, default=None, help="default: the image size recorded with the autoencoder")
    p.add_argument("--adv-weight", type=float, default=0.0,
                   help="> 0: also train against a patch discriminator (hinge loss, scaled to the reconstruction "
                        "loss's gradient) to push the decoder towards sharp, data-like images (default: 0, off)")
    p.add_argument("--adv-start", type=int, default=0, help="step from which the adversarial term is used")
    p.add_argument("--clean-with", default=None, metavar="MODEL",
                   help="a latent flow (folder or shipped name) over this autoencoder's latents: train on its "
                        "Tweedie-cleaned noisy latents instead of z + σε; σ is the flow's training noise")
    p.add_argument("--clean-draws", type=int, default=4, help="noisy copies per training image for --clean-with")
    p.add_argument("--seed", type=int, default=0)
    add_threads_arg(p)
    add_device_arg(p)
    return p


def _command(args, dataset) -> str:
    parts = ["starflow", "finetune-decoder", "--autoencoder", args.autoencoder, "--out", args.out,
             "--sigma", str(args.sigma), "--dataset", dataset, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--recon-loss", args.recon_loss,
             "--seed", str(args.seed)]
    if args.flip:
        parts.append("--flip")
    if args.adv_weight:
        parts += ["--adv-weight", str(args.adv_weight), "--adv-start", str(args.adv_start)]
    if args.image_size is not None:
        parts += ["--image-size", str(args.image_size)]
    if args.clean_with:
        parts += ["--clean-with", args.clean_with, "--clean-draws", str(args.clean_draws)]
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _cleaned(args, ae, dataset: str, train, test, labels, device):
    """(train, test) decoder inputs: ``--clean-draws`` noisy latents per train image (one per test image)
    cleaned by the ``--clean-with`` flow's Tweedie step, with the index of each one's image. ``labels``: the
    splits' (train, test) class labels from ``split_train_test``, read by a class-conditional flow."""
    from starflow.pipeline import StarflowPipeline  # lazy: sub-command help must not import torch
    from starflow.train.decoder_inputs import tweedie_cleaned_latents  # lazy: sub-command help must not import torch

    pipe = StarflowPipeline.from_pretrained(args.clean_with, device=device, denoise="tweedie")
    if pipe.autoencoder is None or pipe.autoencoder.encoder_fingerprint() != ae.encoder_fingerprint():
        raise ValueError(f"{args.clean_with} does not model {args.autoencoder}'s latents (its autoencoder's encoder "
                         "differs), so its Tweedie step cannot clean them")
    if args.sigma is not None and args.sigma != pipe.noise_std:
        raise ValueError(f"--sigma {args.sigma} differs from the noise {pipe.noise_std} {args.clean_with} was trained "
                         "with; leave --sigma out with --clean-with")
    args.sigma = float(pipe.noise_std)
    if pipe.num_classes and dataset.startswith("folder:"):
        raise ValueError(f"{args.clean_with} is class-conditional: --clean-with needs a labelled dataset "
                         "(mnist, digits), not a folder")
    if not pipe.num_classes:
        labels = (None, None)
    out = []
    for split, images, split_labels, draws in (("train", train, labels[0], args.clean_draws),
                                               ("test", test, labels[1], 1)):
        t0 = time.time()
        out.append(tweedie_cleaned_latents(pipe, images, split_labels, draws=draws, seed=args.seed))
        print(f"finetune-decoder: {split} latents cleaned by {args.clean_with}'s Tweedie step (σ={args.sigma}, "
              f"{draws} draw(s) per image): {len(out[-1][0])} in {time.time() - t0:.0f}s")
    return out[0], out[1][0]


def check_encoder_identical(original_dir: str, new_dir: str) -> int:
    """Raise if any encoder-side tensor differs bit-for-bit; return how many were compared."""
    import torch

    from safetensors.torch import load_file

    # lazy: sub-command help must not import torch
    from starflow.components.autoencoder import DIFFUSERS_WEIGHTS, ENCODER_PREFIXES

    a = load_file(os.path.join(original_dir, DIFFUSERS_WEIGHTS))
    b = load_file(os.path.join(new_dir, DIFFUSERS_WEIGHTS))
    keys = [k for k in a if k.startswith(ENCODER_PREFIXES)]
    bad = [k for k in keys if k not in b or a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    if bad or not keys:
        raise RuntimeError(f"encoder weights changed during decoder fine-tuning: {bad[:5]}")
    return len(keys)


def run(args) -> int:
    import torch

    # lazy: sub-command help must not import torch
    from starflow.components.autoencoder import Autoencoder, resolve_autoencoder
    from starflow.cli.train_autoencoder import split_train_test  # lazy: sub-command help must not import torch
    # lazy: sub-command help must not import torch
    from starflow.train.autoencoder_trainer import (FinetuneConfig, config_to_dict, finetune_decoder,
                                                    reconstruction_psnr)

    apply_threads(args.threads)
    if args.sigma is not None and args.sigma < 0:
        raise ValueError("--sigma must be >= 0")
    if args.clean_draws < 1:
        raise ValueError(f"--clean-draws must be >= 1, got {args.clean_draws}")
    device = resolve_device(args.device)
    ae = resolve_autoencoder(args.autoencoder, device=device)
    dataset = args.dataset or ae.info.get("dataset")
    if not dataset:
        raise ValueError(f"{args.autoencoder} does not record its dataset; pass --dataset")
    # the autoencoder's own image size (shapes renders at any size) unless the user overrides it
    train, test, labels = split_train_test(dataset, args.image_size or ae.info.get("image_size"), ae.image_channels)
    if train.shape[1] != ae.image_channels:
        raise ValueError(f"dataset {dataset!r} has {train.shape[1]}-channel images; the autoencoder expects "
                         f"{ae.image_channels}")
    inputs = test_inputs = None
    if args.clean_with:
        inputs, test_inputs = _cleaned(args, ae, dataset, train, test, labels, device)
    elif args.sigma is None:
        args.sigma = 0.3
    cfg = FinetuneConfig(sigma=args.sigma, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         recon_loss=args.recon_loss, flip=args.flip, seed=args.seed,
                         adv_weight=args.adv_weight, adv_start=args.adv_start)

    def psnrs(model) -> dict:
        out = {"clean": reconstruction_psnr(model, test), "noisy": reconstruction_psnr(model, test, sigma=args.sigma)}
        if test_inputs is not None:
            out["tweedie_cleaned"] = reconstruction_psnr(model, test, latents=test_inputs)
        return out

    before = psnrs(ae)
    print(f"finetune-decoder: original decoder test PSNR clean {before['clean']:.2f} dB, "
          f"σ={args.sigma} {before['noisy']:.2f} dB"
          + (f", Tweedie-cleaned {before['tweedie_cleaned']:.2f} dB" if test_inputs is not None else ""))
    t0 = time.time()
    ft, hist = finetune_decoder(ae, train, cfg, device=device, inputs=inputs)
    secs = time.time() - t0
    ft.info = dict(ae.info, finetuned_from=args.autoencoder, finetune_command=_command(args, dataset))
    ft.save_pretrained(args.out, dtype=ae.source_dtype)
    n = check_encoder_identical(ae.source_dir, args.out)
    re = Autoencoder.from_pretrained(args.out, device=device)
    after = psnrs(re)
    m = {"dataset": dataset, "sigma": args.sigma, "test_images": len(test),
         "original": before, "finetuned": after, "train_seconds": secs, "threads": torch.get_num_threads(),
         "encoder_tensors_checked_identical": n, "config": config_to_dict(cfg)}
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(m, f, indent=2)
    inputs_text = (f"on z + σε cleaned by `{args.clean_with}`'s Tweedie step (x̂ = x̃ + σ²∇log p(x̃), the flow's exact "
                   f"score; {args.clean_draws} noisy copies per image) -> x, the inputs that flow's pipeline decodes"
                   if args.clean_with else "on z + σε -> x with z the normalised posterior mean and fresh ε each step")
    cols = ["clean", "noisy"] + (["tweedie_cleaned"] if test_inputs is not None else [])
    lines = [f"# Decoder fine-tuned for σ = {args.sigma}", "",
             "Made by (from the repository root):", "", "```", _command(args, dataset), "```", "",
             f"Encoder and latent normalisation are those of `{args.autoencoder}` "
             f"({n} encoder tensors verified bit-identical); only the decoder and post_quant_conv were trained, "
             + inputs_text
             + (f", with a patch-discriminator hinge loss (weight {args.adv_weight}, from step {args.adv_start})."
                if args.adv_weight else "."), "",
             f"Test PSNR (dB, {len(test)} held-out images, mean over images):", "",
             "| decoder | clean latent | latent + σε |" + (" Tweedie-cleaned latent + σε |" if test_inputs is not None else ""),
             "|---|---|---|" + ("---|" if test_inputs is not None else ""),
             "| original | " + " | ".join(f"{before[c]:.2f}" for c in cols) + " |",
             f"| fine-tuned (σ={args.sigma}) | " + " | ".join(f"{after[c]:.2f}" for c in cols) + " |", "",
             f"Fine-tuning time: {secs:.0f} s on {device} with {torch.get_num_threads()} thread(s).", ""]
    with open(os.path.join(args.out, "RECIPE.md"), "w") as f:
        f.write("\n".join(lines))
    print(f"saved {args.out}: fine-tuned decoder test PSNR clean {after['clean']:.2f} dB, "
          f"σ={args.sigma} {after['noisy']:.2f} dB ({secs:.0f}s)")
    return 0
