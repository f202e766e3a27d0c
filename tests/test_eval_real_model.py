"""``starflow eval`` on real (tiny, untrained) saved pipelines: the contract with starflow.models."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

pytest.importorskip("starflow.pipeline")
pytest.importorskip("starflow.flow.model")



def _tiny_pipeline(tmp_path, latent: bool):
    from starflow.flow.config import FlowConfig
    from starflow.flow.model import STARFlow
    from starflow.pipeline import StarflowPipeline

    torch.manual_seed(0)
    if latent:
        from starflow.components.autoencoder import available_default_autoencoders, load_default_autoencoder

        if "mnist" not in available_default_autoencoders():
            pytest.skip("the default MNIST autoencoder is not shipped")
        ae = load_default_autoencoder("mnist")
        c, side, _ = ae.latent_shape(28)
        cfg = FlowConfig(in_channels=c, image_size=side, patch_size=1, width=32, head_dim=16, num_blocks=2,
                         layers_per_block=1, num_classes=10)
        pipe = StarflowPipeline(STARFlow(cfg), autoencoder=ae, noise_std=0.3)
    else:
        cfg = FlowConfig(in_channels=1, image_size=28, patch_size=4, width=32, head_dim=16, num_blocks=2,
                         layers_per_block=1, num_classes=10)
        pipe = StarflowPipeline(STARFlow(cfg))
    path = tmp_path / ("latent" if latent else "pixel")
    pipe.save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("latent", [False, True])
def test_eval_cli_on_saved_pipeline(tmp_path, latent):
    from starflow.cli import eval as eval_cli
    from starflow.evaluation.report import validate_report

    ckpt = _tiny_pipeline(tmp_path, latent)
    out = tmp_path / "r.json"
    parser = argparse.ArgumentParser()
    eval_cli.add_parser(parser.add_subparsers(dest="command"), "eval")
    rc = eval_cli.run(parser.parse_args(["eval", ckpt, "--metrics", "fd,pr,acc,nll", "--num-samples", "20", "--feature-size", "32",
               "--nll-max", "40", "--batch-size", "20", "--cache-dir", str(tmp_path / "cache"), "--out", str(out),
               "--device", "cpu", "--quiet"]))
    assert rc == 0
    r = json.loads(out.read_text())
    validate_report(r)
    m = r["metrics"]
    assert r["model"]["conditional"] and r["model"]["num_classes"] == 10
    assert m["fd"]["status"] == "ok" and m["fd"]["n_gen"] == 20
    # an untrained flow is far from the data: worse FD than real images at the same n, low accuracy
    assert m["fd"]["value"] > 2 * m["fd"]["real_baseline"]["value"]
    assert m["acc"]["status"] == "ok" and m["acc"]["accuracy"] < 0.5
    nll = m["nll"]
    assert nll["status"] == "ok" and nll["nats_per_dim"]["n"] == 40
    if latent:
        assert nll["space"] == "latent" and nll["noise_std"] == 0.3
        assert nll["bits_per_dim"] is None and "not implemented" in nll["reasons"]["bits_per_dim"]
    else:
        assert nll["space"] == "pixel" and nll["bits_per_dim"]["n"] == 40
        assert nll["bits_per_dim"]["mean"] > 7.0  # bits/dim on the 8-bit grid, untrained model
