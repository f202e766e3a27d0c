"""Latent space: autoencoder wrapper, latent cache, noise injection, decoder fine-tuning, Tweedie denoising."""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace as dataclasses_replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from starflow.components.autoencoder import (DIFFUSERS_WEIGHTS, Autoencoder, default_autoencoder_dir, images_to_float,
                                  load_default_autoencoder)
from starflow.data.latents import LatentDataset, add_latent_noise
from starflow.components.denoise import clean_latents, tweedie_denoise


def tiny_vae(in_ch=1, latent=4, blocks=(8, 8), attention=False):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    n = len(blocks)
    return AutoencoderKL(in_channels=in_ch, out_channels=in_ch, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=blocks, layers_per_block=1,
                         latent_channels=latent, norm_num_groups=8, sample_size=16, scaling_factor=0.5,
                         shift_factor=0.25, mid_block_add_attention=attention)


class TinyImages(torch.utils.data.Dataset):
    def __init__(self, n=12, c=1, size=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, c, size, size), generator=g, dtype=torch.uint8)
        self.labels = torch.arange(n) % 10

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.labels[i]


@pytest.fixture
def ae():
    return Autoencoder(tiny_vae()).eval()


# ---------------------------------------------------------------- wrapper basics

def test_encode_decode_shapes_and_dtype(ae):
    assert (ae.image_channels, ae.latent_channels, ae.downsample) == (1, 4, 2)
    assert ae.scaling_factor == 0.5 and ae.shift_factor == 0.25
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        z = ae.encode(x)
        y = ae.decode(z)
        z64 = ae.encode(x.double())
        zu8 = ae.encode(TinyImages(3).images)
    assert z.shape == (3, 4, 8, 8) and z.dtype == torch.float32
    assert ae.latent_shape(16) == (4, 8, 8)
    assert y.shape == x.shape and y.dtype == torch.float32 and y.min() >= -1 and y.max() <= 1
    assert z64.dtype == torch.float64 and zu8.dtype == torch.float32
    with pytest.raises(ValueError, match="expects 1-channel images, got 3"):
        ae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ValueError, match="expects 4-channel latents"):
        ae.decode(torch.zeros(1, 3, 8, 8))


def test_normalisation_round_trip(ae):
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        raw = ae.vae.encode(x).latent_dist.mean
        z = ae.encode(x)
        torch.testing.assert_close(z, (raw - 0.25) * 0.5)
        torch.testing.assert_close(ae.denormalize(z), raw)
        torch.testing.assert_close(ae.normalize(ae.denormalize(z)), z)
        # decode(z) runs the diffusers decoder on the de-normalised latent
        torch.testing.assert_close(ae.decode(z, clamp=False), ae.vae.decode(raw).sample)
        # posterior sampling: seeded, differs from the mean by about the posterior std
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        s1, s2 = ae.encode(x, sample=True, generator=g1), ae.encode(x, sample=True, generator=g2)
    torch.testing.assert_close(s1, s2)
    assert not torch.equal(s1, z)


def test_images_to_float_range():
    u = torch.tensor([0, 255, 128], dtype=torch.uint8)
    f = images_to_float(u)
    assert f[0] == -1 and f[1] == 1 and abs(f[2].item() - 0.00392) < 1e-3


# ---------------------------------------------------------------- save / load / errors

def test_save_load_roundtrip_and_diffusers_compat(ae, tmp_path):
    ae.set_normalization(2.0, -0.5)
    ae.save_pretrained(str(tmp_path / "m"))
    re = Autoencoder.from_pretrained(str(tmp_path / "m"))
    assert (re.scaling_factor, re.shift_factor) == (2.0, -0.5)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(re.encode(x), ae.encode(x))
        torch.testing.assert_close(re.decode(re.encode(x)), ae.decode(ae.encode(x)))
    # the directory is a plain diffusers directory too
    from diffusers import AutoencoderKL

    v = AutoencoderKL.from_pretrained(str(tmp_path / "m"), low_cpu_mem_usage=False)
    assert v.config.scaling_factor == 2.0


def test_vae_path_loads_plain_diffusers_directory(tmp_path):
    """--vae PATH: a small AutoencoderKL saved by diffusers itself (as an SD-VAE would be) loads, with the
    normalisation read from its config; a pipeline folder with a vae/ sub-folder works too."""
    vae = tiny_vae(in_ch=3, attention=True)
    vae.save_pretrained(str(tmp_path / "pipe" / "vae"))
    with open(tmp_path / "pipe" / "model_index.json", "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline"}, f)
    for p in (tmp_path / "pipe" / "vae", tmp_path / "pipe"):
        ae = Autoencoder.from_pretrained(str(p), image_channels=3)
        assert (ae.scaling_factor, ae.shift_factor, ae.image_channels, ae.downsample) == (0.5, 0.25, 3, 2)
        x = torch.rand(2, 3, 16, 16) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(ae.encode(x), (vae.encode(x).latent_dist.mean - 0.25) * 0.5)
    # a sidecar overrides the config's constants
    with open(tmp_path / "pipe" / "vae" / "starflow_autoencoder.json", "w") as f:
        json.dump({"scaling_factor": 3.0, "shift_factor": 0.0}, f)
    assert Autoencoder.from_pretrained(str(tmp_path / "pipe")).scaling_factor == 3.0


def test_autoencoder_tiny_supported(tmp_path):
    from diffusers import AutoencoderTiny

    t = AutoencoderTiny(in_channels=3, out_channels=3, encoder_block_out_channels=(8, 8, 8),
                        decoder_block_out_channels=(8, 8, 8), num_encoder_blocks=(1, 1, 1),
                        num_decoder_blocks=(1, 1, 1), latent_channels=4)
    t.save_pretrained(str(tmp_path / "t"))
    ae = Autoencoder.from_pretrained(str(tmp_path / "t"))
    assert ae.kind == "tiny" and ae.downsample == 4
    with torch.no_grad():
        z = ae.encode(torch.zeros(1, 3, 32, 32))
        assert z.shape == (1, 4, 8, 8)
        assert ae.decode(z).shape == (1, 3, 32, 32)


def test_wrong_format_and_channel_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Autoencoder.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="expected config.json"):
        Autoencoder.from_pretrained(str(tmp_path / "empty"))
    # a starflow/hub-style model dir, not a diffusers autoencoder
    (tmp_path / "flow").mkdir()
    with open(tmp_path / "flow" / "config.json", "w") as f:
        json.dump({"model_type": "starflow"}, f)
    with pytest.raises(ValueError, match="_class_name 'AutoencoderKL'"):
        Autoencoder.from_pretrained(str(tmp_path / "flow"))
    # a UNet config
    (tmp_path / "unet").mkdir()
    with open(tmp_path / "unet" / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel"}, f)
    with pytest.raises(ValueError, match="UNet2DConditionModel"):
        Autoencoder.from_pretrained(str(tmp_path / "unet"))
    # config but only pickled weights
    vae = tiny_vae()
    d = tmp_path / "bin"
    vae.save_config(str(d))
    (d / "diffusion_pytorch_model.bin").write_bytes(b"\x80")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        Autoencoder.from_pretrained(str(d))
    # channel counts
    vae.save_pretrained(str(tmp_path / "ok"))
    with pytest.raises(ValueError, match="takes 1-channel images .* expected in_channels=3"):
        Autoencoder.from_pretrained(str(tmp_path / "ok"), image_channels=3)
    with pytest.raises(ValueError, match="has 4 latent channels .* 16 were expected"):
        Autoencoder.from_pretrained(str(tmp_path / "ok"), latent_channels=16)
    # weights that do not fit the config
    shutil.copytree(tmp_path / "ok", tmp_path / "bad")
    cfg = json.loads((tmp_path / "bad" / "config.json").read_text())
    cfg["block_out_channels"] = [16, 16]
    (tmp_path / "bad" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="could not load AutoencoderKL|do not match"):
        Autoencoder.from_pretrained(str(tmp_path / "bad"))
    # missing tensors
    shutil.copytree(tmp_path / "ok", tmp_path / "missing")
    w = load_file(str(tmp_path / "missing" / DIFFUSERS_WEIGHTS))
    w.pop("decoder.conv_out.weight")
    save_file(w, str(tmp_path / "missing" / DIFFUSERS_WEIGHTS))
    with pytest.raises(ValueError, match="decoder.conv_out.weight"):
        Autoencoder.from_pretrained(str(tmp_path / "missing"))


# ---------------------------------------------------------------- latent cache and noise

def test_latent_cache_matches_fresh_encode_and_invalidates(ae, tmp_path):
    ds = TinyImages(12)
    a = LatentDataset(ae, ds, "tiny", "train", cache_dir=str(tmp_path), batch_size=5)
    assert not a.from_cache and len(a) == 12
    b = LatentDataset(ae, ds, "tiny", "train", cache_dir=str(tmp_path), batch_size=5)
    assert b.from_cache
    with torch.no_grad():
        fresh = torch.cat([ae.encode(ds.images[i:i + 5]) for i in range(0, 12, 5)])
    assert torch.equal(b.latents, fresh)
    z, y = b[3]
    assert torch.equal(z, fresh[3]) and y == ds.labels[3]
    # a decoder-only change keeps the cache (latents do not depend on the decoder) ...
    with torch.no_grad():
        ae.vae.decoder.conv_out.bias.add_(1.0)
    assert LatentDataset(ae, ds, "tiny", "train", cache_dir=str(tmp_path)).from_cache
    # ... an encoder change, a normalisation change or different images invalidate it
    with torch.no_grad():
        ae.vae.encoder.conv_in.bias.add_(0.1)
    c = LatentDataset(ae, ds, "tiny", "train", cache_dir=str(tmp_path), batch_size=5)
    assert not c.from_cache and not torch.equal(c.latents, fresh)
    with torch.no_grad():
        assert torch.equal(c.latents, torch.cat([ae.encode(ds.images[i:i + 5]) for i in range(0, 12, 5)]))
    ae.set_normalization(1.0, 0.0)
    assert not LatentDataset(ae, ds, "tiny", "train", cache_dir=str(tmp_path)).from_cache
    assert not LatentDataset(ae, TinyImages(12, seed=1), "tiny", "train", cache_dir=str(tmp_path)).from_cache
    # flips: 2N items, second half are the flipped images' latents
    f = LatentDataset(ae, ds, "tiny", "train", cache_dir=False, flip=True)
    with torch.no_grad():
        assert len(f) == 24 and torch.equal(f.latents[12:], ae.encode(ds.images.flip(-1)))
    assert f[15][1] == ds.labels[3]


def test_latent_cache_string_labels(ae, tmp_path):
    class Captioned(TinyImages):
        def __getitem__(self, i):
            return self.images[i], f"caption {i}"

    ds = Captioned(4)
    del ds.labels
    a = LatentDataset(ae, ds, "cap", "train", cache_dir=str(tmp_path))
    b = LatentDataset(ae, ds, "cap", "train", cache_dir=str(tmp_path))
    assert b.from_cache and b[2][1] == "caption 2" and torch.equal(a.latents, b.latents)


def test_add_latent_noise():
    z = torch.zeros(20000)
    n = add_latent_noise(z, 0.3, generator=torch.Generator().manual_seed(0))
    assert abs(n.std().item() - 0.3) < 0.01 and abs(n.mean().item()) < 0.01
    assert torch.equal(add_latent_noise(z, 0.3, torch.Generator().manual_seed(0)), n)
    assert torch.equal(add_latent_noise(z, 0.0), z)
    with pytest.raises(ValueError):
        add_latent_noise(z, -1.0)


# ---------------------------------------------------------------- Tweedie

def test_tweedie_matches_gaussian_closed_form():
    """x ~ N(0, τ²), x̃ = x + σε: p(x̃) = N(0, τ² + σ²) and E[x|x̃] = x̃ τ²/(τ² + σ²)."""
    tau, sigma = 0.7, 0.3

    def log_prob(x):  # per-example log-density of N(0, (τ²+σ²) I) over all dims
        v = tau ** 2 + sigma ** 2
        return (-0.5 * x.pow(2) / v - 0.5 * math.log(2 * math.pi * v)).flatten(1).sum(1)

    g = torch.Generator().manual_seed(0)
    x_noisy = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    out = tweedie_denoise(log_prob, x_noisy, sigma)
    torch.testing.assert_close(out, x_noisy * tau ** 2 / (tau ** 2 + sigma ** 2))
    torch.testing.assert_close(tweedie_denoise(log_prob, x_noisy, sigma, batch_size=2), out)
    assert not x_noisy.requires_grad and not out.requires_grad


def test_tweedie_on_affine_gaussian_flow_matches_posterior_mean():
    """A 'flow' x = A u + b, u ~ N(0, I), evaluated by exact change of variables; the data is
    x0 ~ N(b, C0) and the flow models x̃ ~ N(b, C0 + σ²I). Tweedie must give b + C0 (C0 + σ²I)^-1 (x̃ - b)."""
    torch.manual_seed(0)
    d, sigma = 4, 0.3
    L0 = torch.randn(d, d, dtype=torch.float64) * 0.5
    C0 = L0 @ L0.T + 0.1 * torch.eye(d, dtype=torch.float64)
    C = C0 + sigma ** 2 * torch.eye(d, dtype=torch.float64)
    A = torch.linalg.cholesky(C)  # the flow's linear map
    b = torch.randn(d, dtype=torch.float64)

    def flow_log_prob(x):  # inverse u = A^-1 (x - b); log p = log N(u) - log|det A|
        u = torch.linalg.solve_triangular(A, (x - b).T, upper=False).T
        return -0.5 * u.pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi) - torch.log(torch.diagonal(A)).sum()

    x_noisy = b + torch.randn(6, d, dtype=torch.float64) @ A.T
    expected = b + (x_noisy - b) @ torch.linalg.solve(C, C0).T  # C0 C^-1 (x̃-b), C0 and C symmetric
    torch.testing.assert_close(tweedie_denoise(flow_log_prob, x_noisy, sigma), expected)
    torch.testing.assert_close(clean_latents(x_noisy, sigma, "tweedie", flow_log_prob), expected)
    assert clean_latents(x_noisy, sigma, "decoder") is x_noisy
    with pytest.raises(ValueError, match="log_prob_fn"):
        clean_latents(x_noisy, sigma, "tweedie")
    with pytest.raises(ValueError, match="one log-density per example"):
        tweedie_denoise(lambda x: x.sum(), x_noisy, sigma)


# ---------------------------------------------------------------- training and decoder fine-tuning

def test_train_and_finetune_decoder_only_changes_decoder(tmp_path):
    from starflow.cli.finetune_decoder import check_encoder_identical
    from starflow.train.autoencoder_trainer import (AutoencoderTrainConfig, FinetuneConfig, finetune_decoder,
                                                    reconstruction_psnr, train_autoencoder)

    imgs = TinyImages(32, c=3, size=8).images  # RGB path (image_channels=3)
    cfg = AutoencoderTrainConfig(steps=3, batch_size=8, block_out_channels=(8, 8), norm_num_groups=8,
                                 flip=True, log_every=10)
    ae, hist = train_autoencoder(imgs, cfg, log=lambda s: None, eval_images=imgs[:4])
    assert ae.image_channels == 3 and ae.latent_shape(8) == (4, 4, 4)
    with torch.no_grad():  # normalisation: train latents have mean 0, std 1
        z = ae.encode(imgs)
    assert abs(z.mean().item()) < 1e-4 and abs(z.std().item() - 1) < 1e-4
    assert math.isfinite(hist["test_psnr"])
    ae.save_pretrained(str(tmp_path / "orig"), dtype=torch.float16)
    orig = Autoencoder.from_pretrained(str(tmp_path / "orig"))
    ft, _ = finetune_decoder(orig, imgs, FinetuneConfig(sigma=0.3, steps=3, batch_size=8, lr=1e-2, log_every=10),
                             log=lambda s: None)
    assert ft.decoder_noise_sigma == 0.3 and orig.decoder_noise_sigma is None
    ft.save_pretrained(str(tmp_path / "ft"), dtype=orig.source_dtype)
    assert check_encoder_identical(str(tmp_path / "orig"), str(tmp_path / "ft")) > 0
    a = load_file(str(tmp_path / "orig" / DIFFUSERS_WEIGHTS))
    b = load_file(str(tmp_path / "ft" / DIFFUSERS_WEIGHTS))
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    re = Autoencoder.from_pretrained(str(tmp_path / "ft"))
    assert re.decoder_noise_sigma == 0.3 and re.scaling_factor == orig.scaling_factor
    x = imgs[:4]
    with torch.no_grad():
        assert torch.equal(re.encode(x), orig.encode(x))
        assert not torch.equal(re.decode(orig.encode(x)), orig.decode(orig.encode(x)))
    assert reconstruction_psnr(re, x) > 0


def test_aligned_autoencoder_keeps_the_reference_latent_space():
    """--align-to: a 2x-bigger-image autoencoder whose encoder regresses the reference's latents of the
    downsampled image; its normalisation is the reference's, and the regression error falls."""
    from starflow.train.autoencoder_trainer import AutoencoderTrainConfig, reference_latents, train_autoencoder

    small = TinyImages(32, c=3, size=8).images
    ref, _ = train_autoencoder(small, AutoencoderTrainConfig(steps=2, batch_size=8, block_out_channels=(8, 8),
                                                             norm_num_groups=8), log=lambda s: None)
    big = small.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 16x16; area-downsampling gives `small` back
    mean, _ = reference_latents(ref, big)
    with torch.no_grad():
        assert torch.allclose(mean, ref.encode_raw(small), atol=1e-5)
    cfg = AutoencoderTrainConfig(steps=30, batch_size=8, lr=3e-3, block_out_channels=(8, 8, 8), norm_num_groups=8,
                                 log_every=5)
    ae, hist = train_autoencoder(big, cfg, log=lambda s: None, align_to=ref)
    assert (ae.scaling_factor, ae.shift_factor) == (ref.scaling_factor, ref.shift_factor)
    assert ae.latent_shape(16) == ref.latent_shape(8)
    assert hist["kl"][-1] < 0.5 * hist["kl"][0]  # 'kl' logs the alignment error here
    with pytest.raises(ValueError, match="reference autoencoder's latents"):
        train_autoencoder(big, AutoencoderTrainConfig(steps=1, block_out_channels=(8, 8), norm_num_groups=8),
                          log=lambda s: None, align_to=ref)
    with pytest.raises(ValueError, match="flip"):
        train_autoencoder(big, dataclasses_replace(cfg, flip=True), log=lambda s: None, align_to=ref)


def test_finetune_cli_end_to_end(tmp_path):
    """The CLI path: save a tiny model, fine-tune via `starflow finetune-decoder` on the digits data."""
    import argparse

    from starflow.cli import finetune_decoder as cli

    vae = tiny_vae(in_ch=1, blocks=(8, 8))
    ae = Autoencoder(vae, info={"dataset": "digits"})  # 8x8 sklearn digits
    ae.save_pretrained(str(tmp_path / "orig"))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli.add_parser(sub, "finetune-decoder")
    args = p.parse_args(["finetune-decoder", "--autoencoder", str(tmp_path / "orig"), "--out", str(tmp_path / "ft"),
                         "--sigma", "0.3", "--steps", "2", "--batch-size", "8", "--device", "cpu"])
    assert cli.run(args) == 0
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["encoder_tensors_checked_identical"] > 0 and "finetune-decoder" in (tmp_path / "ft" / "RECIPE.md").read_text()
    assert Autoencoder.from_pretrained(str(tmp_path / "ft")).decoder_noise_sigma == 0.3


# ---------------------------------------------------------------- committed weights

def _shipped(name):
    return os.path.exists(os.path.join(default_autoencoder_dir(name), DIFFUSERS_WEIGHTS))


@pytest.mark.skipif(not _shipped("mnist"), reason="MNIST autoencoder weights not committed yet")
def test_committed_mnist_autoencoder_loads_offline_and_reconstructs(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from starflow.data import DigitsDataset
    from starflow.train.autoencoder_trainer import reconstruction_psnr

    ae = load_default_autoencoder("mnist")
    assert (ae.image_channels, ae.latent_channels, ae.downsample) == (1, 4, 4)
    test = DigitsDataset("mnist", "test").images[:100]
    with torch.no_grad():
        z = ae.encode(test)
    assert z.shape == (100, 4, 7, 7)
    assert abs(z.mean().item()) < 0.2 and 0.8 < z.std().item() < 1.2  # normalised to ~unit variance
    assert reconstruction_psnr(ae, test) > 20.0
    recipe = open(os.path.join(default_autoencoder_dir("mnist"), "RECIPE.md")).read()
    assert "starflow train-autoencoder" in recipe and "PSNR" in recipe


@pytest.mark.parametrize("name", ["mnist", "shapes", "shapes64"])
def test_committed_finetuned_decoder_shares_encoder_and_reads_noisy_latents(name):
    if not (_shipped(name) and _shipped(name + "_ft")):
        pytest.skip(f"{name} autoencoders not committed")
    from starflow.cli.finetune_decoder import check_encoder_identical
    from starflow.data.latents import dataset_images, load_named_dataset
    from starflow.train.autoencoder_trainer import reconstruction_psnr

    assert check_encoder_identical(default_autoencoder_dir(name), default_autoencoder_dir(name + "_ft")) > 0
    base, ft = load_default_autoencoder(name), load_default_autoencoder(name + "_ft")
    assert ft.decoder_noise_sigma == 0.3 and ft.scaling_factor == base.scaling_factor
    assert ft.encoder_fingerprint() == base.encoder_fingerprint()
    side = base.info.get("image_size")
    test = dataset_images(load_named_dataset(name.removesuffix("64"), "test", image_size=side))[:100]
    if name.startswith("shapes"):
        assert base.latent_shape(side) == (4, 8, 8) and base.image_channels == 3
        assert reconstruction_psnr(base, test) > 25.0
    # the fine-tuned decoder is better on σ=0.3-noisy latents than the original one
    assert reconstruction_psnr(ft, test, sigma=0.3) > reconstruction_psnr(base, test, sigma=0.3)


@pytest.mark.skipif(not (_shipped("shapes") and _shipped("shapes64")), reason="shapes autoencoders not committed")
def test_committed_64px_shapes_autoencoder_shares_the_32px_latent_space():
    """The 8x autoencoder encodes a 64x64 scene to (nearly) the latent the 4x one gives its 32x32 rendering,
    so the shapes flows sample at 64x64 through it."""
    from starflow.data.shapes import ShapesDataset

    small, big = load_default_autoencoder("shapes"), load_default_autoencoder("shapes64")
    assert big.downsample == 8 and (big.scaling_factor, big.shift_factor) == (small.scaling_factor, small.shift_factor)
    with torch.no_grad():
        z32 = small.encode(ShapesDataset("test", size=100, image_size=32).images())
        z64 = big.encode(ShapesDataset("test", size=100, image_size=64).images())
    assert z64.shape == z32.shape == (100, 4, 8, 8)
    assert (z64 - z32).pow(2).mean() < 0.01  # normalised units: latents have unit variance


@pytest.mark.skipif(not (_shipped("mnist") and _shipped("mnist_ft")), reason="MNIST autoencoders not committed yet")
def test_build_latent_dataset_shared_between_base_and_finetuned(tmp_path):
    from starflow.data.latents import build_latent_dataset

    a = build_latent_dataset("mnist", "test", autoencoder="mnist", cache_dir=str(tmp_path))
    assert not a.from_cache and a.latent_shape == (4, 7, 7) and len(a) == 500 and a.labels.dtype == torch.long
    b = build_latent_dataset("mnist", "test", autoencoder="mnist_ft", cache_dir=str(tmp_path))
    assert b.from_cache and torch.equal(a.latents, b.latents)  # same encoder -> same cache
    with pytest.raises(ValueError, match="3-channel"):
        build_latent_dataset("mnist", "test", autoencoder=Autoencoder(tiny_vae(in_ch=3)), cache_dir=False)


def test_tweedie_through_the_flow_model_is_per_example_and_matches_finite_differences():
    """Through the real flow's exact log_prob: batching does not mix examples, and the score agrees with a
    central finite difference of log p along a random direction."""
    flow_model = pytest.importorskip("starflow.flow.model")
    config = pytest.importorskip("starflow.flow.config")
    torch.manual_seed(0)
    cfg = config.FlowConfig(in_channels=4, image_size=4, patch_size=1, width=32, head_dim=16, num_blocks=2,
                            layers_per_block=1, num_classes=10)
    model = flow_model.STARFlow(cfg).double().eval()
    x = torch.randn(3, 4, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 3, 7])
    full = tweedie_denoise(lambda v: model.log_prob(v, y), x, 0.3)
    single = torch.cat([tweedie_denoise(lambda v: model.log_prob(v, y[i:i + 1]), x[i:i + 1], 0.3) for i in range(3)])
    torch.testing.assert_close(full, single)
    d = torch.randn_like(x)
    h = 1e-2  # log_prob sums z² in float32, so a tiny step would be dominated by rounding
    with torch.no_grad():
        fd = (model.log_prob(x + h * d, y) - model.log_prob(x - h * d, y)) / (2 * h)
    analytic = ((full - x) / 0.09 * d).flatten(1).sum(1)
    torch.testing.assert_close(analytic, fd, rtol=2e-3, atol=1e-3)
