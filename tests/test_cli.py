"""The command line, end to end on tiny models."""
import json
import os

import pytest
import torch
from PIL import Image

from conftest import FIXTURES, perturbed, tiny_config
from starflow import STARFlow
from starflow.cli import main


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=10)), scale=0.02)
    path = str(tmp_path / "model")
    model.save_pretrained(path)
    return path


def test_sample_grid_and_files(saved, tmp_path, capsys):
    out = str(tmp_path / "grid.png")
    assert main(["sample", saved, "--num-images", "6", "--class", "3", "--out", out, "--device", "cpu"]) == 0
    assert Image.open(out).size[0] > 8
    folder = str(tmp_path / "imgs")
    assert main(["sample", saved, "-n", "3", "--out", folder, "--no-grid", "--sampler", "jacobi",
                 "--guidance", "1.5", "--guidance-rule", "tarflow"]) == 0
    assert sorted(os.listdir(folder)) == ["0000.png", "0001.png", "0002.png"]
    assert Image.open(os.path.join(folder, "0000.png")).size == (8, 8)


def test_sample_bad_input(saved, capsys):
    assert main(["sample", saved, "--class", "12"]) == 2
    assert "class index 12 out of range" in capsys.readouterr().err
    assert main(["sample", saved, "--num-images", "0"]) == 2
    assert main(["sample", saved, "--guidance", "-2"]) == 2
    assert "guidance weight" in capsys.readouterr().err
    assert main(["sample", "/nonexistent/model"]) == 2
    assert "not found" in capsys.readouterr().err


def test_nll_on_digits(saved, capsys, tmp_path):
    report = tmp_path / "nll.json"
    assert main(["nll", saved, "--dataset", "digits", "--split", "test", "--out", str(report)]) == 0
    out = capsys.readouterr().out
    assert "bits/dim" in out and "n=300" in out and "p99" in out
    figures = json.loads(report.read_text())
    assert figures["n"] == 300 and figures["median"] <= figures["p90"] <= figures["p99"] <= figures["max"]
    assert f"{figures['mean']:.4f} ± {figures['ci95']:.4f}" in out


def test_nll_summary_hand_computed():
    from starflow.evaluation.likelihood import spread_summary

    s = spread_summary(torch.arange(1, 201, dtype=torch.float64))  # 1..200
    assert s["mean"] == 100.5 and s["max"] == 200 and s["median"] == 101 and s["p99"] == 198
    assert s["mean_without_top1pct"] == 99.5  # 1..198
    # Student-t half-width, t_{0.975, 199} = 1.9719565
    assert abs(s["ci95"] - 1.9719565 * torch.arange(1, 201, dtype=torch.float64).std().item() / 200 ** 0.5) < 1e-5
    with_inf = spread_summary(torch.tensor([1.0, 2.0, float("inf")]))
    assert with_inf["mean"] == with_inf["ci95"] == float("inf") and with_inf["median"] == 2.0


def test_train_cli_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model:\n  image_size: 8\n  patch_size: 2\n  width: 32\n  head_dim: 16\n  num_blocks: 2\n"
                   "  layers_per_block: 1\n  num_classes: 10\ntrain:\n  dataset: digits\n  batch_size: 16\n"
                   "  warmup_steps: 1\n  sample_every: 4\n")
    out = str(tmp_path / "run")
    assert main(["train", "--config", str(cfg), "--out-dir", out, "--steps", "4", "--set", "train.ckpt_every=2"]) == 0
    assert os.path.exists(os.path.join(out, "model", "model_index.json"))
    assert os.path.exists(os.path.join(out, "model", "model", "model.safetensors"))
    assert main(["sample", os.path.join(out, "model"), "-n", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert os.path.exists(os.path.join(out, "checkpoints", "step_0000004", "manifest.json"))
    # model / data mismatch is named
    assert main(["train", "--config", str(cfg), "--out-dir", out, "--set", "model.image_size=16"]) == 2
    assert "expects (1, 16, 16)" in capsys.readouterr().err


@pytest.mark.skipif(not os.path.exists(os.path.join(FIXTURES, "tarflow_official_small.safetensors")), reason="no fixture")
def test_convert_tarflow_cli(tmp_path):
    src = os.path.join(FIXTURES, "tarflow_official_small.safetensors")
    out = str(tmp_path / "conv")
    assert main(["convert-tarflow", src, "--config", src.replace(".safetensors", ".json"), "--out", out]) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "starflow" and cfg["cond_mode"] == "add"


@pytest.mark.parametrize("model_type, fields", [
    ("rectified-flow", "  in_channels: 1\n  image_size: 8\n  patch_size: 2\n  width: 32\n  depth: 1\n  heads: 2\n  num_classes: 10\n  sample_steps: 4\n"),
    ("flowar", "  in_channels: 1\n  image_size: 8\n  scales: [1, 2, 4, 8]\n  width: 32\n  depth: 1\n  heads: 2\n  head_width: 32\n  head_depth: 1\n  head_heads: 2\n  num_classes: 10\n  sample_steps: 2\n"),
])
def test_peer_models_train_and_sample_through_the_same_cli(tmp_path, model_type, fields, capsys):
    cfg = tmp_path / "peer.yaml"
    cfg.write_text(f"model:\n{fields}train:\n  dataset: digits\n  batch_size: 16\n  warmup_steps: 1\n  sample_every: 3\n")
    out = str(tmp_path / "run")
    assert main(["train", "--model", model_type, "--config", str(cfg), "--out-dir", out, "--steps", "3"]) == 0
    png = str(tmp_path / "peer.png")
    assert main(["sample", os.path.join(out, "model"), "-n", "4", "--guidance", "1", "--out", png]) == 0
    assert Image.open(png).size[0] > 8
    assert main(["nll", os.path.join(out, "model"), "--dataset", "digits"]) == 2
    assert "no exact likelihood" in capsys.readouterr().err


def test_shipped_recipes_build():
    import glob

    from starflow.train.recipe import load_run_config
    from starflow.models import model_class

    for path in glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")):
        run = load_run_config(path)
        assert model_class(run.model_type)(run.model).num_params() > 0
