"""Trainer: exact resume, atomic checkpoints, non-finite guard; save/load; bad input."""
import json
import os

import pytest
import torch

from conftest import perturbed, tiny_config
from starflow import STARFlow, TrainConfig
from starflow.data import DigitsDataset
from starflow.train import checkpoint as ckpt
from starflow.train.trainer import Trainer


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", out_dir=str(tmp_path), steps=8, batch_size=16, log_every=1, ckpt_every=4,
                sample_every=100, warmup_steps=2, lr=3e-3)
    base.update(kw)
    return TrainConfig(**base)


def _model():
    torch.manual_seed(0)
    return STARFlow(tiny_config(num_classes=10))


def _losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def digits():
    return DigitsDataset("digits", "train")


def test_resume_reproduces_uninterrupted_run(tmp_path, digits, monkeypatch):
    full = Trainer(_model(), digits, _cfg(tmp_path / "full"))
    full.train()

    interrupted = Trainer(_model(), digits, _cfg(tmp_path / "cut"))
    real_step = Trainer.train_step

    def dying_step(self, step):
        if step == 5:  # after the step-4 checkpoint, mid-way to the next one
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    monkeypatch.setattr(Trainer, "train_step", real_step)

    resumed = Trainer(_model(), digits, _cfg(tmp_path / "cut"))
    resumed.train(resume="auto")
    assert resumed.step == 8
    a, b = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert set(a) == set(range(1, 9))
    for step in range(1, 9):
        assert a[step] == b[step], f"loss differs at step {step}"
    for (name, p), q in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(p, q), name
    for p, q in zip(full.ema.state_dict().values(), resumed.ema.state_dict().values()):
        assert torch.equal(p, q)


def test_training_lowers_loss_and_exports(tmp_path, digits):
    t = Trainer(_model(), digits, _cfg(tmp_path, steps=30, ckpt_every=15, sample_every=30))
    out = t.train()
    losses = _losses(tmp_path)
    assert sum(losses[s] for s in range(26, 31)) < sum(losses[s] for s in range(1, 6))
    assert os.path.exists(os.path.join(tmp_path, "samples", "step_0000030.png"))
    loaded = STARFlow.from_pretrained(os.path.join(out, "model"))
    assert torch.equal(loaded.blocks[0].proj_in.weight, t.ema.module.blocks[0].proj_in.weight)


def test_corrupt_checkpoint_is_skipped(tmp_path, digits):
    t = Trainer(_model(), digits, _cfg(tmp_path, steps=8, ckpt_every=4))
    t.train()
    paths = ckpt.list_checkpoints(os.path.join(tmp_path, "checkpoints"))
    assert [os.path.basename(p) for p in paths] == ["step_0000004", "step_0000008"]
    with open(os.path.join(paths[-1], "model.safetensors"), "r+b") as f:
        f.seek(200)
        f.write(b"garbage!")
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint"):
        assert ckpt.latest_valid(os.path.join(tmp_path, "checkpoints")) == paths[0]
    # A half-written folder (no manifest) is never picked either.
    os.makedirs(os.path.join(tmp_path, "checkpoints", "step_0000009"))
    with pytest.warns(UserWarning):
        assert ckpt.latest_valid(os.path.join(tmp_path, "checkpoints")) == paths[0]


def test_nonfinite_loss_skips_then_rolls_back(tmp_path, digits, monkeypatch):
    t = Trainer(_model(), digits, _cfg(tmp_path, steps=12, ckpt_every=4, max_nonfinite_in_a_row=3))
    real_loss = STARFlow.loss
    calls = {"n": 0}

    def flaky_loss(self, x, y=None, text=None):
        calls["n"] += 1
        if 6 <= calls["n"] < 9:  # three NaN steps in a row after the step-4 checkpoint
            return real_loss(self, x, y) * float("nan")
        return real_loss(self, x, y)

    monkeypatch.setattr(STARFlow, "loss", flaky_loss)
    with pytest.warns(UserWarning, match="rolled back"):
        t.train()
    events = [json.loads(l) for l in open(os.path.join(tmp_path, "log.jsonl"))]
    assert sum(e.get("event") == "skipped" for e in events) == 3
    rollback = [e for e in events if e.get("event") == "rollback"]
    assert len(rollback) == 1 and rollback[0]["step"] == 4 and rollback[0]["lr_scale"] == 0.5
    assert t.step == 12 and all(torch.isfinite(p).all() for p in t.model.parameters())


def test_save_load_round_trip(tmp_path):
    model = perturbed(STARFlow(tiny_config(num_classes=3)))
    model.save_pretrained(str(tmp_path / "m"))
    loaded = STARFlow.from_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model(x, y=torch.tensor([0, 2]))[0], loaded(x, y=torch.tensor([0, 2]))[0])


def test_bad_checkpoints_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        STARFlow.from_pretrained(str(tmp_path / "nope"))
    model = STARFlow(tiny_config())
    model.save_pretrained(str(tmp_path / "m"))
    with open(tmp_path / "m" / "model.safetensors", "wb") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(ValueError, match="corrupt"):
        STARFlow.from_pretrained(str(tmp_path / "m"))
    with open(tmp_path / "m" / "config.json", "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="corrupt config"):
        STARFlow.from_pretrained(str(tmp_path / "m"))
