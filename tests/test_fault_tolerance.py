"""Crash safety: SIGTERM saves the step reached, SIGKILL in the middle of a checkpoint loses nothing but
the steps since the previous one, a corrupt published checkpoint is skipped and set aside, and every
TrainConfig field is validated with a message that names it."""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from starflow.errors import ConfigError
from starflow.train.config import TrainConfig
from starflow.train.recipe import load_run_config
from starflow.train import checkpoint as ckpt
from starflow.train.build import build_trainer

RECIPE = """model:
  image_size: 8
  patch_size: 2
  width: 32
  head_dim: 16
  num_blocks: 2
  layers_per_block: 1
  deep_layers: 2
  num_classes: 10
train:
  dataset: digits
  batch_size: 16
  warmup_steps: 2
  lr: 0.003
  log_every: 1
  sample_every: 100000
  ckpt_every: {ckpt_every}
  steps: {steps}
"""

# Seeded the same way as the in-process reference, so the model starts from the same weights.
LAUNCH = """
import os, signal, sys
import torch
torch.manual_seed(0)
kill_at = int(os.environ.get("KILL_DURING_CHECKPOINT", "0"))
if kill_at:
    from safetensors.torch import save
    from starflow.train import checkpoint as ck
    real = ck.write_tensors
    def dying(folder, tensors):
        if os.path.basename(folder).startswith(".tmp-step_%07d" % kill_at):
            real(folder, {"model": tensors["model"]})               # one file complete,
            blob = save({k: v.contiguous() for k, v in tensors["ema"].items()})
            with open(os.path.join(folder, "ema.safetensors"), "wb") as f:
                f.write(blob[: len(blob) // 2])                     # the next cut in half,
                f.flush()
            os.kill(os.getpid(), signal.SIGKILL)                    # and the power goes.
        return real(folder, tensors)
    ck.write_tensors = dying
from starflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _recipe(tmp_path, steps, ckpt_every):
    path = tmp_path / "recipe.yaml"
    path.write_text(RECIPE.format(steps=steps, ckpt_every=ckpt_every))
    return str(path)


def _launch(recipe, out_dir, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **(env_extra or {}))
    return subprocess.Popen([sys.executable, "-c", LAUNCH, "train", "--config", recipe, "--out-dir", out_dir,
                             "--device", "cpu", "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _trainer(recipe, out_dir):
    torch.manual_seed(0)
    return build_trainer(load_run_config(recipe, {"train.out_dir": str(out_dir), "train.device": "cpu"}))


def _events(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _assert_same_weights(a, b):
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(a.ema.state_dict().values(), b.ema.state_dict().values()):
        assert torch.equal(p, q)


def test_sigterm_saves_the_step_reached_and_resume_matches_uninterrupted(tmp_path):
    recipe = _recipe(tmp_path, steps=40, ckpt_every=1000)
    out = str(tmp_path / "cut")
    proc = _launch(recipe, out)
    log = os.path.join(out, "log.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(log) and sum(1 for _ in open(log)) >= 2:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "training ended before the signal: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    stop = [e for e in _events(out) if e.get("event") == "interrupted"]
    assert len(stop) == 1 and stop[0]["signal"] == "SIGTERM"
    reached = max(e["step"] for e in _events(out) if "loss" in e)
    assert stop[0]["step"] == reached and 2 <= reached < 40
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(os.path.join(out, "checkpoints"))] == \
        [f"step_{reached:07d}"]
    assert f"stopped by SIGTERM at step {reached}" in err

    resumed = _trainer(recipe, out)
    resumed.train(resume="auto")
    assert [e["step"] for e in _events(out) if e.get("event") == "resume"] == [reached]
    full = _trainer(recipe, tmp_path / "full")
    full.train()
    assert resumed.step == full.step == 40
    _assert_same_weights(resumed, full)


def test_sigkill_mid_checkpoint_resumes_from_the_previous_good_one(tmp_path):
    recipe = _recipe(tmp_path, steps=12, ckpt_every=4)
    out = str(tmp_path / "cut")
    proc = _launch(recipe, out, {"KILL_DURING_CHECKPOINT": "8"})
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    root = os.path.join(out, "checkpoints")
    temp, good = sorted(os.listdir(root))
    assert good == "step_0000004" and temp.startswith(".tmp-step_0000008-")
    assert os.path.getsize(os.path.join(root, temp, "ema.safetensors")) > 0  # the half-written file

    resumed = _trainer(recipe, out)
    with pytest.warns(UserWarning, match="removed 1 partial checkpoint folder"):
        resumed.train(resume="auto")
    assert [e["checkpoint"] for e in _events(out) if e.get("event") == "resume"] == [os.path.join(root, "step_0000004")]
    assert sorted(os.listdir(root)) == ["step_0000004", "step_0000008", "step_0000012"]  # temp folder gone
    full = _trainer(recipe, tmp_path / "full")
    full.train()
    _assert_same_weights(resumed, full)


def test_corrupt_published_checkpoint_is_skipped_and_set_aside(tmp_path):
    recipe = _recipe(tmp_path, steps=8, ckpt_every=4)
    full = _trainer(recipe, tmp_path / "run")
    full.train()
    root = os.path.join(tmp_path, "run", "checkpoints")
    with open(os.path.join(root, "step_0000008", "model.safetensors"), "r+b") as f:
        f.truncate(100)  # a truncated file inside a checkpoint the manifest vouches for
    resumed = _trainer(recipe, tmp_path / "run")
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        resumed.train(resume="auto")
    assert [e["step"] for e in _events(tmp_path / "run") if e.get("event") == "resume"] == [4]
    assert sorted(os.listdir(root)) == [".corrupt-step_0000008", "step_0000004", "step_0000008"]
    _assert_same_weights(resumed, full)


def test_keep_last_never_prunes_the_checkpoint_just_written(tmp_path):
    root = str(tmp_path)
    t = {"model": {"w": torch.ones(2)}}
    ckpt.save_checkpoint(root, 4, t, {}, keep_last=1)
    os.makedirs(os.path.join(root, "step_0000012"))  # a stale, manifest-less folder of a later step
    ckpt.save_checkpoint(root, 8, t, {}, keep_last=1)
    assert sorted(os.listdir(root)) == ["step_0000008", "step_0000012"]
    with pytest.warns(UserWarning, match="skipping corrupt"):
        assert ckpt.latest_valid(root) == os.path.join(root, "step_0000008")


# ---- config validation --------------------------------------------------------------------------------
BAD = {
    "dataset": ["", "cifar", 3], "image_size": [0, "big", 2.5], "channels": [0, "1"], "dataset_size": [0, -5],
    "scene_categories": ["position", 3, ["position"]],  # a list, and only for the shapes dataset
    "autoencoder": ["", 5], "decoder": ["", 7], "text_encoder": ["", 1], "out_dir": ["", None],
    "steps": [0, 1.5, "10", True], "batch_size": [0, -1, 8.0], "lr": [0, -1e-3, "fast", float("nan"), float("inf")],
    "weight_decay": [-0.1, "x"], "input_spline_lr_mult": [0.0, -1.0], "betas": [(0.9,), (0.9, 1.0), "0.9,0.95", (0.9, "a")], "warmup_steps": [-1, 0.5],
    "min_lr_ratio": [-0.1, 1.5], "grad_clip": [0, -1, None], "ema_decay": [1.0, -0.5], "ema_warmup": ["yes", 1], "noise_std": [-0.1, "n"], "shift_augment": [-1, 5, 1.5],
    "seed": [-1, 2**40, 0.5], "log_every": [0], "ckpt_every": [0, -3], "sample_every": [0], "keep_last": [0],
    "num_workers": [-1, 1.5], "precision": ["fp16", "", 16], "device": ["gpu", "", 0],
    "max_nonfinite_in_a_row": [0], "max_rollbacks": [0, -1, 1.5], "distributed": ["deepspeed", ""], "grad_accum_steps": [0, 3, 1.5],
    "grad_checkpointing": ["yes", 1], "ddp_find_unused_parameters": ["no", 0], "init_from": ["", " ", 3],
}


def test_every_train_config_field_is_validated_by_name():
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    assert names == set(BAD), f"fields without a bad-value case: {sorted(names - set(BAD))}"
    for name, values in BAD.items():
        for value in values:
            kw = {name: value}
            if name == "grad_accum_steps" and value == 3:
                kw["batch_size"] = 64  # not divisible
            if name == "decoder" and value == "":
                kw["autoencoder"] = "mnist"
            with pytest.raises(ConfigError, match=f"^{name}: "):
                TrainConfig(**kw)
    # cross-field rules name the field to change
    for bad, match in (([], "must not be empty"), (["position", "circles"], r"unknown \['circles'\]")):
        with pytest.raises(ConfigError, match=f"^scene_categories: {match}"):
            TrainConfig(dataset="shapes", scene_categories=bad)
    with pytest.raises(ConfigError, match="^decoder: needs train.autoencoder"):
        TrainConfig(decoder="mnist_ft")
    with pytest.raises(ConfigError, match="^image_size: a folder dataset needs image_size"):
        TrainConfig(dataset="folder:/data")
    # YAML reads 1e-3 (no dot) as a string: accepted as the number it spells
    assert TrainConfig(lr="1e-3").lr == 1e-3


def test_train_cli_names_the_bad_field(tmp_path, capsys):
    from starflow.cli import main

    recipe = _recipe(tmp_path, steps=4, ckpt_every=2)
    assert main(["train", "--config", recipe, "--out-dir", str(tmp_path / "o"), "--set", "train.grad_accum_steps=0"]) == 2
    assert "grad_accum_steps: must be positive, got 0" in capsys.readouterr().err
    assert main(["train", "--config", recipe, "--out-dir", str(tmp_path / "o"), "--set", "train.batch_size=12",
                 "--set", "train.grad_accum_steps=5"]) == 2
    assert "grad_accum_steps: batch_size 12 is not divisible by grad_accum_steps 5" in capsys.readouterr().err
