"""Train a small KL autoencoder (diffusers ``AutoencoderKL``) on the shipped data, and fine-tune its
decoder to read noisy latents.

* ``train_autoencoder``: reconstruction (L1 + L2 by default) + a small KL term on the posterior,
  Adam with warm-up and cosine decay; afterwards the latent normalisation (global shift = mean, scale =
  1/std of the posterior-mean latents over the train split) is computed and stored.
* ``train_autoencoder(..., align_to=ref)``: a bigger-image autoencoder in a *reference* autoencoder's
  latent space: the encoder regresses ``ref``'s latents of the image area-downsampled to ``ref``'s size,
  the decoder learns to draw the full-size image from ``ref``'s latents, and the reference's latent
  normalisation is kept. A flow trained on ``ref``'s latents then samples at the new size (64x64 shapes
  through 8x from the 32x32 4x autoencoder's 4x8x8 latents) without retraining.
* ``finetune_decoder``: encoder frozen; the decoder (and ``post_quant_conv``) is trained to map
  ``z + σε`` (normalised latents, fresh ε each step) back to the image. Encoder weights and the latent
  normalisation are untouched, so latents cached for the original autoencoder stay valid.
* ``reconstruction_psnr``: mean per-image PSNR (dB, images scaled to [0, 1]) of
  ``decode(encode(x) + σε)`` on held-out images.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from starflow.components.autoencoder import Autoencoder, images_to_float
from starflow.schema import check_types
from starflow.train.discriminator import (PatchDiscriminator, adaptive_adversarial_weight, discriminator_hinge_loss,
                                          generator_hinge_loss)
from starflow.train.schedule import warmup_cosine


@dataclass
class AutoencoderTrainConfig:
    steps: int = 1500
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    min_lr_ratio: float = 0.05
    kl_weight: float = 1e-4  # weight of KL (summed over latent elements) per image pixel-element
    recon_loss: str = "l1+l2"  # one of RECON_LOSSES
    latent_channels: int = 4
    block_out_channels: tuple = (32, 64, 64)  # len-1 downsamplings: (32, 64, 64) -> 4x
    layers_per_block: int = 1
    norm_num_groups: int = 32
    mid_attention: bool = False
    flip: bool = False  # random horizontal flips (not for digits)
    seed: int = 0
    log_every: int = 100
    grad_clip: float = 1.0

    def __post_init__(self):
        check_types(self)


@dataclass
class FinetuneConfig:
    sigma: float = 0.3
    steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    warmup: int = 50
    min_lr_ratio: float = 0.05
    recon_loss: str = "l1+l2"
    flip: bool = False
    seed: int = 0
    log_every: int = 100
    grad_clip: float = 1.0
    adv_weight: float = 0.0  # > 0: add a patch-discriminator hinge loss (see starflow.train.discriminator)
    adv_start: int = 0  # step from which the adversarial term is used (the discriminator trains throughout)
    disc_lr: float = 2e-4

    def __post_init__(self):
        check_types(self)


def build_autoencoderkl(image_channels: int, image_size: int, cfg: AutoencoderTrainConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.block_out_channels)
    for c in cfg.block_out_channels:
        if c % cfg.norm_num_groups:
            raise ValueError(f"block_out_channels {cfg.block_out_channels} must be multiples of "
                             f"norm_num_groups={cfg.norm_num_groups}")
    down = 2 ** (n - 1)
    if image_size % down:
        raise ValueError(f"image size {image_size} is not divisible by the downsampling factor {down} "
                         f"implied by block_out_channels={cfg.block_out_channels}")
    return AutoencoderKL(
        in_channels=image_channels, out_channels=image_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups, sample_size=image_size,
        scaling_factor=1.0, mid_block_add_attention=cfg.mid_attention, force_upcast=False,
    )


RECON_LOSSES = ("l1", "l2", "l1+l2", "censored-l1", "censored-l1+l2")


def _recon_loss(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """``censored-*``: pixels are clipped data, so a target at the range's end (pure black or white) means
    "at least that far": a prediction beyond it costs nothing. Without it, a decoder that is unsure whether
    a pixel is stroke or background hedges and leaves a faint halo on MNIST's pure-black background, which
    is invisible but far from the data in any feature space (see benchmarks/decoder_ceiling.py)."""
    if kind.startswith("censored-"):
        kind = kind[len("censored-"):]
        pred = torch.where(target <= -1, torch.maximum(pred, target), pred)
        pred = torch.where(target >= 1, torch.minimum(pred, target), pred)
    if kind == "l1":
        return (pred - target).abs().mean()
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1+l2":
        return (pred - target).abs().mean() + F.mse_loss(pred, target)
    raise ValueError(f"unknown recon_loss {kind!r}; expected one of {', '.join(RECON_LOSSES)}")


def _batch(images: torch.Tensor, idx: torch.Tensor, flip: bool, gen: torch.Generator, device) -> torch.Tensor:
    x = images_to_float(images[idx]).to(device)
    if flip:
        m = (torch.rand(len(idx), generator=gen) < 0.5).to(device)
        x = torch.where(m.view(-1, 1, 1, 1), x.flip(-1), x)
    return x


@torch.no_grad()
def compute_latent_normalization(ae: Autoencoder, images: torch.Tensor, batch_size: int = 250) -> tuple[float, float]:
    """(scaling_factor, shift_factor) = (1/std, mean) of the raw posterior-mean latents over ``images``."""
    was = ae.training
    ae.eval()
    raws = [ae.encode_raw(images[i:i + batch_size]).float().cpu() for i in range(0, len(images), batch_size)]
    ae.train(was)
    raw = torch.cat(raws)
    mean, std = raw.mean().item(), raw.std().item()
    if not math.isfinite(std) or std <= 0:
        raise ValueError(f"latents have degenerate std {std}")
    return 1.0 / std, mean


@torch.no_grad()
def reconstruction_psnr(ae: Autoencoder, images: torch.Tensor, sigma: float = 0.0, seed: int = 0,
                        batch_size: int = 250, latents: torch.Tensor | None = None) -> float:
    """Mean per-image PSNR (dB, data range 1 on [0,1] images) of decode(encode(x) + σε), or of
    decode(``latents``) when given (one row per image, e.g. noisy latents already cleaned)."""
    was = ae.training
    ae.eval()
    gen = torch.Generator().manual_seed(seed)
    psnrs = []
    for i in range(0, len(images), batch_size):
        x = images_to_float(images[i:i + batch_size]).float()
        z = ae.encode(x).float().cpu() if latents is None else latents[i:i + batch_size]
        if sigma > 0 and latents is None:
            z = z + sigma * torch.randn(z.shape, generator=gen)
        y = ae.decode(z.to(ae.device)).float().cpu()
        mse = ((y - x) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-12)
        psnrs.append(-10 * torch.log10(mse))
    ae.train(was)
    return torch.cat(psnrs).mean().item()


@torch.no_grad()
def reference_latents(ref: Autoencoder, images: torch.Tensor, batch_size: int = 250) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of ``ref``'s raw posterior for uint8 ``images`` area-downsampled to ``ref``'s image size."""
    size = ref.vae.config.sample_size
    if images.shape[-1] % size:
        raise ValueError(f"image size {images.shape[-1]} is not a multiple of the reference autoencoder's {size}")
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = F.interpolate(images_to_float(images[i:i + batch_size]).float(), size=(size, size), mode="area")
        post = ref.vae.encode(x.to(ref.device, ref.dtype)).latent_dist
        means.append(post.mean.float().cpu())
        stds.append(post.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def train_autoencoder(train_images: torch.Tensor, cfg: AutoencoderTrainConfig, device="cpu",
                      log: Callable[[str], None] = print, eval_images: torch.Tensor | None = None,
                      align_to: Autoencoder | None = None) -> tuple[Autoencoder, dict]:
    """Train on uint8 images [N,C,H,W] (square). Returns the autoencoder (normalisation set) and a
    history dict (losses, seconds, final eval PSNR on ``eval_images`` if given). With ``align_to`` the
    latent space is the reference's (see the module docstring); ``kl`` then logs the encoder's
    mean-squared error to the reference latents, in normalised units."""
    if train_images.ndim != 4 or train_images.shape[-1] != train_images.shape[-2]:
        raise ValueError(f"expected square images [N,C,H,W], got {tuple(train_images.shape)}")
    torch.manual_seed(cfg.seed)
    c, size = train_images.shape[1], train_images.shape[-1]
    vae = build_autoencoderkl(c, size, cfg)
    down = 2 ** (len(cfg.block_out_channels) - 1)
    if align_to is not None:
        if cfg.flip:
            raise ValueError("flip cannot be combined with align_to (the reference latents are of unflipped images)")
        ref_mean, ref_std = reference_latents(align_to, train_images)
        want = (cfg.latent_channels, size // down, size // down)
        if tuple(ref_mean.shape[1:]) != want:
            raise ValueError(f"the reference autoencoder's latents are {tuple(ref_mean.shape[1:])}, this one's "
                             f"would be {want}: match --latent-channels and the downsampling factor")
        ref_target = align_to.normalize(ref_mean)  # what the encoder regresses, in unit-variance units
    ae = Autoencoder(vae, scaling_factor=1.0, shift_factor=0.0).to(device)
    ae.train()
    opt = torch.optim.Adam(ae.vae.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    n_pix = c * size * size
    hist = {"step": [], "recon": [], "kl": []}
    t0 = time.time()
    run_rec = run_kl = 0.0
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        idx = torch.randint(0, len(train_images), (cfg.batch_size,), generator=gen)
        x = _batch(train_images, idx, cfg.flip, gen, device)
        post = ae.vae.encode(x).latent_dist
        if align_to is None:
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen).to(device)
            kl = post.kl().mean() / n_pix
        else:  # decoder reads the reference's latents; encoder regresses them (normalised units)
            m = ref_mean[idx]
            z = (m + ref_std[idx] * torch.randn(m.shape, generator=gen)).to(device)
            kl = (align_to.normalize(post.mean) - ref_target[idx].to(device)).pow(2).mean()
        y = ae.vae.decode(z).sample
        rec = _recon_loss(y, x, cfg.recon_loss)
        loss = rec + (cfg.kl_weight if align_to is None else 1.0) * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(ae.vae.parameters(), cfg.grad_clip)
        opt.step()
        run_rec += rec.item()
        run_kl += kl.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = (step % cfg.log_every) + 1
            hist["step"].append(step + 1)
            hist["recon"].append(run_rec / k)
            hist["kl"].append(run_kl / k)
            log(f"step {step + 1}/{cfg.steps}  recon {run_rec / k:.4f}  "
                f"{'kl/pixel' if align_to is None else 'align mse'} {run_kl / k:.3f}  {time.time() - t0:.0f}s")
            run_rec = run_kl = 0.0
    ae.eval()
    if align_to is None:
        scale, shift = compute_latent_normalization(ae, train_images)
    else:
        scale, shift = align_to.scaling_factor, align_to.shift_factor
    ae.set_normalization(scale, shift)
    hist["train_seconds"] = time.time() - t0
    hist["scaling_factor"], hist["shift_factor"] = scale, shift
    if eval_images is not None:
        hist["test_psnr"] = reconstruction_psnr(ae, eval_images)
    return ae, hist


def finetune_decoder(ae: Autoencoder, train_images: torch.Tensor, cfg: FinetuneConfig, device="cpu",
                     log: Callable[[str], None] = print,
                     inputs: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[Autoencoder, dict]:
    """Return a copy of ``ae`` whose decoder is fine-tuned on (z + σε) -> x; the encoder is frozen
    (its parameters are not given to the optimiser and stay bit-identical). ``inputs = (latents, image
    index)``: decode these instead of fresh z + σε (e.g. ``decoder_inputs.tweedie_cleaned_latents``)."""
    if cfg.sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {cfg.sigma}")
    from starflow.data.latents import encode_images  # lazy: only the components a recipe uses are imported

    torch.manual_seed(cfg.seed)
    ft = copy.deepcopy(ae).to(device)
    ft.eval()
    # latents of the (un-flipped and, if used, flipped) train images, computed once
    if inputs is None:
        z_all = encode_images(ft, train_images, flip=cfg.flip)
        x_all = torch.cat([train_images, train_images.flip(-1)]) if cfg.flip else train_images
    elif cfg.flip:
        raise ValueError("flip is not available with precomputed decoder inputs")
    else:
        z_all, x_all = inputs[0], train_images[inputs[1]]
    for p in ft.vae.parameters():
        p.requires_grad_(False)
    params = ft.decoder_parameters()
    for p in params:
        p.requires_grad_(True)
    ft.vae.train()
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.5, 0.9) if cfg.adv_weight > 0 else (0.9, 0.999))
    disc = disc_opt = None
    if cfg.adv_weight > 0:
        disc = PatchDiscriminator(x_all.shape[1]).to(device)
        disc_opt = torch.optim.Adam(disc.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9))
    gen = torch.Generator().manual_seed(cfg.seed)
    hist = {"step": [], "recon": [], "adv": [], "disc": []}
    t0 = time.time()
    run = {"recon": 0.0, "adv": 0.0, "disc": 0.0}
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = cfg.lr * warmup_cosine(step, cfg.steps, cfg.warmup, cfg.min_lr_ratio)
        idx = torch.randint(0, len(z_all), (cfg.batch_size,), generator=gen)
        z = z_all[idx] if inputs is not None else z_all[idx] + cfg.sigma * torch.randn(z_all[idx].shape, generator=gen)
        x = images_to_float(x_all[idx]).to(device)
        y = ft.vae.decode(ft.denormalize(z.to(device))).sample
        rec = _recon_loss(y, x, cfg.recon_loss)
        loss, adv = rec, torch.zeros(())
        if disc is not None and step >= cfg.adv_start:
            adv = _decoder_adversarial_loss(ft, disc, y, rec)
            loss = rec + cfg.adv_weight * adv
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if disc is not None:
            run["disc"] += _discriminator_step(disc, disc_opt, x, y.detach())
        run["recon"] += rec.item()
        run["adv"] += adv.item()
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = (step % cfg.log_every) + 1
            hist["step"].append(step + 1)
            for key in run:
                hist[key].append(run[key] / k)
            adv_text = f"  adv {run['adv'] / k:.4f}  disc {run['disc'] / k:.4f}" if disc is not None else ""
            log(f"step {step + 1}/{cfg.steps}  recon {run['recon'] / k:.4f}{adv_text}  {time.time() - t0:.0f}s")
            run = dict.fromkeys(run, 0.0)
    for p in ft.vae.parameters():
        p.requires_grad_(True)
    ft.eval()
    ft.decoder_noise_sigma = 0.0 if inputs is not None else cfg.sigma  # cleaned inputs: a flow's Tweedie ran first
    hist["train_seconds"] = time.time() - t0
    return ft, hist


def _decoder_adversarial_loss(ae: Autoencoder, disc, y: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
    """The decoder's hinge loss against ``disc``, scaled to the reconstruction's gradient at the last layer."""
    for p in disc.parameters():
        p.requires_grad_(False)
    g = generator_hinge_loss(disc(y))
    for p in disc.parameters():
        p.requires_grad_(True)
    return adaptive_adversarial_weight(rec, g, ae.vae.decoder.conv_out.weight) * g


def _discriminator_step(disc, opt, real: torch.Tensor, fake: torch.Tensor) -> float:
    loss = discriminator_hinge_loss(disc(real), disc(fake))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()


def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_images(name: str, split: str, image_size: int | None = None, channels: int = 3) -> tuple[torch.Tensor, object]:
    """uint8 images [N,C,H,W] of a named dataset (``mnist``, ``digits``, ``shapes[:N]``, ``folder:PATH``)."""
    # lazy: only the components a recipe uses are imported
    from starflow.data.latents import dataset_images, load_named_dataset

    ds = load_named_dataset(name, split, image_size=image_size, channels=channels)
    imgs = dataset_images(ds)
    if imgs.dtype != torch.uint8:
        raise ValueError(f"dataset {name!r} returned {imgs.dtype} images; expected uint8 [N,C,H,W]")
    return imgs, ds
