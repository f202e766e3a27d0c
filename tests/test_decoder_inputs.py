"""Decoder fine-tuning on the flow's own Tweedie-cleaned latents (``finetune-decoder --clean-with``)."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

from conftest import perturbed
from starflow.components.autoencoder import Autoencoder
from starflow.components.denoise import tweedie_denoise
from starflow.flow.config import FlowConfig
from starflow.flow.model import STARFlow
from starflow.pipeline import StarflowPipeline
from starflow.tasks import encode as E
from starflow.train.decoder_inputs import tweedie_cleaned_latents
from test_autoencoder import tiny_vae


def _pipe(noise_std=0.3, num_classes=10, ae=None):
    """1x8x8 digits -> 4x4x4 latents (two down blocks), a class-conditional flow over them."""
    ae = ae or Autoencoder(tiny_vae(in_ch=1), info={"dataset": "digits"}).eval()
    torch.manual_seed(1)
    flow = perturbed(STARFlow(FlowConfig(in_channels=4, image_size=4, patch_size=1, width=32, head_dim=16,
                                         num_blocks=2, layers_per_block=1, num_classes=num_classes)), scale=0.05)
    return StarflowPipeline(flow, ae, noise_std=noise_std, denoise="tweedie")


def _digits(n=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 10


def test_cleaned_latents_are_the_pipeline_s_own_tweedie_step_on_fresh_noise():
    pipe = _pipe()
    images, labels = _digits()
    out, index = tweedie_cleaned_latents(pipe, images, labels, draws=2, seed=3, batch_size=5)
    assert out.shape == (24, 4, 4, 4) and torch.equal(index, torch.arange(12).repeat(2))
    # the same noise, drawn batch by batch in the same order, cleaned by hand with the class condition
    g = torch.Generator().manual_seed(3)
    z = E.to_model_space(pipe, images)
    expected = []
    for _ in range(2):
        for i in range(0, 12, 5):
            zi, yi = z[i:i + 5], labels[i:i + 5]
            noisy = zi + 0.3 * torch.randn(zi.shape, generator=g)
            expected.append(tweedie_denoise(lambda v: pipe.model.log_prob(v, yi), noisy, 0.3))
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected)
    # and they are neither the clean latents nor the noisy ones: the step moved them
    assert (out[:12] - z).abs().max() > 1e-3


def test_cleaned_latents_refuse_what_they_cannot_clean():
    images, labels = _digits(4)
    with pytest.raises(ValueError, match="noise_std > 0"):
        tweedie_cleaned_latents(_pipe(noise_std=0.0), images, labels)
    with pytest.raises(ValueError, match="class labels"):
        tweedie_cleaned_latents(_pipe(), images, None)
    with pytest.raises(ValueError, match="draws"):
        tweedie_cleaned_latents(_pipe(), images, labels, draws=0)
    pixel = StarflowPipeline(perturbed(STARFlow(FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32,
                                                           head_dim=16, num_blocks=2, layers_per_block=1))),
                             noise_std=0.1)
    with pytest.raises(ValueError, match="latent flow"):
        tweedie_cleaned_latents(pixel, images, None)


def test_finetune_decoder_trains_on_the_given_inputs_only():
    from starflow.train.autoencoder_trainer import FinetuneConfig, finetune_decoder

    pipe = _pipe()
    images, labels = _digits(16)
    inputs = tweedie_cleaned_latents(pipe, images, labels, draws=2)
    cfg = FinetuneConfig(sigma=0.3, steps=2, batch_size=8, lr=1e-2, log_every=10)
    ft, _ = finetune_decoder(pipe.autoencoder, images, cfg, log=lambda s: None, inputs=inputs)
    assert ft.decoder_noise_sigma == 0.0  # it reads cleaned latents: the flow's Tweedie step runs first
    x = images[:4]
    with torch.no_grad():
        assert torch.equal(ft.encode(x), pipe.autoencoder.encode(x))
        assert not torch.equal(ft.decode(inputs[0][:4]), pipe.autoencoder.decode(inputs[0][:4]))
    with pytest.raises(ValueError, match="flip"):
        finetune_decoder(pipe.autoencoder, images, FinetuneConfig(steps=1, flip=True), log=lambda s: None,
                         inputs=inputs)


def test_finetune_cli_clean_with_end_to_end(tmp_path):
    from starflow.cli import finetune_decoder as cli

    pipe = _pipe()
    pipe.autoencoder.save_pretrained(str(tmp_path / "ae"))
    pipe.save_pretrained(str(tmp_path / "flow"))
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    cli.add_parser(sub, "finetune-decoder")
    common = ["finetune-decoder", "--autoencoder", str(tmp_path / "ae"), "--clean-with", str(tmp_path / "flow"),
              "--clean-draws", "1", "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    with pytest.raises(ValueError, match="differs from the noise"):
        cli.run(p.parse_args(common + ["--out", str(tmp_path / "bad"), "--sigma", "0.5"]))
    assert cli.run(p.parse_args(common + ["--out", str(tmp_path / "ft")])) == 0
    m = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert m["sigma"] == 0.3 and "tweedie_cleaned" in m["finetuned"]
    assert "Tweedie step" in (tmp_path / "ft" / "RECIPE.md").read_text()
    # another autoencoder's latents are not this flow's to clean
    Autoencoder(tiny_vae(in_ch=1, blocks=(8, 16)), info={"dataset": "digits"}).save_pretrained(str(tmp_path / "other"))
    with pytest.raises(ValueError, match="does not model"):
        cli.run(p.parse_args(["finetune-decoder", "--autoencoder", str(tmp_path / "other"), "--clean-with",
                              str(tmp_path / "flow"), "--out", str(tmp_path / "x"), "--steps", "1"]))
