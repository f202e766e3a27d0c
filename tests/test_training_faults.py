"""Training faults: NaN from the data stops after capped rollbacks, a bad final state never replaces a good
export, edited manifests are rejected (resume falls back), init is seeded, resuming with another batch
size warns, and one output folder has one trainer at a time."""
import json
import os

import pytest
import torch

from starflow.cli import build_parser
from starflow.train.recipe import load_run_config
from starflow.errors import TrainingError
from starflow.train import checkpoint as ckpt
from starflow.train.build import build_trainer

RECIPE = """model:
  image_size: 8
  patch_size: 2
  width: 32
  head_dim: 16
  num_blocks: 2
  layers_per_block: 1
  num_classes: 10
train:
  dataset: digits
  batch_size: 16
  warmup_steps: 1
  lr: 0.003
  log_every: 1
  sample_every: 100000
  ckpt_every: 1
  steps: 3
"""


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return str(path)


def _trainer(recipe, out, **overrides):
    return build_trainer(load_run_config(recipe, {"train.out_dir": str(out), **{f"train.{k}": v for k, v in overrides.items()}}))


def _events(out, kind):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [r for r in map(json.loads, f) if r.get("event") == kind]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_nan_from_the_data_stops_after_capped_rollbacks(recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    bad = _trainer(recipe, out, steps=50, noise_std=1e30, max_nonfinite_in_a_row=2, max_rollbacks=2)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="diverged.*after 2 rollback"):
        bad.train(resume="auto")
    assert len(_events(out, "rollback")) == 2


def test_a_run_ending_in_a_nan_streak_keeps_the_good_export(recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    weights = os.path.join(out, "model", "model", "model.safetensors")
    good = _read(weights)
    t = _trainer(recipe, out, steps=6)
    real = t.train_step
    t.train_step = lambda step: {"skipped": "non-finite loss nan"} if step >= 4 else real(step)
    with pytest.warns(UserWarning), pytest.raises(TrainingError, match="streak of 2 non-finite"):
        t.train(resume="auto")
    assert _read(weights) == good


def test_a_worse_or_non_finite_export_is_refused(recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    weights = os.path.join(out, "model", "model", "model.safetensors")
    good = _read(weights)
    t = _trainer(recipe, out)
    t.resume("auto")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in t.ema.module.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    with pytest.raises(TrainingError, match="worse than the one already in"):
        t.export()
    with torch.no_grad():
        next(t.ema.module.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(TrainingError, match="NaN or infinity"):
        t.export()
    assert _read(weights) == good
    assert sorted(os.listdir(out)) == ["checkpoints", "log.jsonl", "model", "samples", "train.lock"]


def test_a_healthy_export_replaces_the_previous_one(recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    first = _read(os.path.join(out, "model", "model", "model.safetensors"))
    _trainer(recipe, out, steps=5).train(resume="auto")
    assert _read(os.path.join(out, "model", "model", "model.safetensors")) != first
    assert not any(n.startswith("model.") for n in os.listdir(out))  # no staged or set-aside folder left


@pytest.mark.parametrize("edit", ["step", "empty-files", "no-checksum-step", "file-outside"])
def test_an_edited_manifest_is_rejected_and_resume_falls_back(edit, recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out).train()
    newest = os.path.join(out, "checkpoints", "step_0000003")
    path = os.path.join(newest, "manifest.json")
    with open(path) as f:
        manifest = json.load(f)
    if edit == "step":
        manifest["step"] = 2999
    elif edit == "empty-files":
        manifest["files"] = {}
    elif edit == "no-checksum-step":  # a hand-edited manifest without its checksum: the folder name still says
        del manifest["manifest_sha256"]
        manifest["step"] = 2999
    else:
        manifest["files"]["../../escape.safetensors"] = manifest["files"].pop("model.safetensors")
        manifest["manifest_sha256"] = ckpt.manifest_digest(manifest)  # even a re-sealed one
    with open(path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError):
        ckpt.verify(newest, ckpt.FULL_STEMS)
    t = _trainer(recipe, out)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        t.resume("auto")
    assert t.step == 2
    assert os.path.isdir(os.path.join(out, "checkpoints", ".corrupt-step_0000003"))


def test_same_recipe_and_seed_give_the_same_initial_weights(recipe, tmp_path):
    torch.manual_seed(1)
    a = _trainer(recipe, tmp_path / "a").model.state_dict()
    torch.manual_seed(2)  # the global RNG does not matter
    b = _trainer(recipe, tmp_path / "b").model.state_dict()
    c = _trainer(recipe, tmp_path / "c", seed=5).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_resuming_with_another_batch_size_warns(recipe, tmp_path):
    out = tmp_path / "run"
    _trainer(recipe, out, steps=1).train()
    t = _trainer(recipe, out, batch_size=32)
    with pytest.warns(UserWarning, match="trained with batch_size 16, this run uses 32"):
        t.resume("auto")


def test_two_trainers_cannot_share_an_output_folder(recipe, tmp_path):
    out = tmp_path / "run"
    first = _trainer(recipe, out)
    lock = first._lock()
    try:
        with pytest.raises(TrainingError, match=f"in use by another trainer \\(pid {os.getpid()}\\)"):
            _trainer(recipe, out).train()
    finally:
        lock.close()
    _trainer(recipe, out, steps=1).train()  # free again once the first lets go


def test_the_recipe_device_is_not_overridden_by_the_cli_default(tmp_path):
    args = build_parser().parse_args(["train", "--config", "r.yaml"])
    assert args.device is None  # so train.py leaves the recipe's train.device alone
    assert build_parser().parse_args(["train", "--config", "r.yaml", "--device", "cpu"]).device == "cpu"
