"""Trainer: exact resume (also into a model that registers its modules in another order), atomic
checkpoints, non-finite guard; save/load; bad input."""
import json
import os
import shutil

import pytest
import torch

from conftest import perturbed, tiny_config
from starflow import STARFlow, TrainConfig
from starflow.data import DigitsDataset
from starflow.errors import CheckpointError
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


def _crash_at_step_5(trainer, monkeypatch):
    """Train until step 5 dies: after the step-4 checkpoint, mid-way to the next one."""
    real_step = Trainer.train_step

    def dying_step(self, step):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    monkeypatch.setattr(Trainer, "train_step", real_step)


def _assert_same_run(full, full_dir, resumed, resumed_dir):
    """The same loss at every step and the same weights and EMA (matched by name) at the end."""
    a, b = _losses(full_dir), _losses(resumed_dir)
    assert set(a) == set(range(1, 9))
    for step in range(1, 9):
        assert a[step] == b[step], f"loss differs at step {step}"
    for mine, theirs in ((full.model, resumed.model), (full.ema, resumed.ema)):
        theirs = theirs.state_dict()
        for name, p in mine.state_dict().items():
            assert torch.equal(p, theirs[name]), name


def test_resume_reproduces_uninterrupted_run(tmp_path, digits, monkeypatch):
    full = Trainer(_model(), digits, _cfg(tmp_path / "full"))
    full.train()

    _crash_at_step_5(Trainer(_model(), digits, _cfg(tmp_path / "cut")), monkeypatch)

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


class ReorderedSTARFlow(STARFlow):
    """STARFlow with each block's sub-modules registered in reverse order, as after a refactor that moves an
    attribute: the same parameter names and shapes, another ``parameters()`` order (the optimizer's)."""

    def __init__(self, config):
        super().__init__(config)
        for block in self.blocks:
            for name in reversed(list(block._modules)):
                block._modules[name] = block._modules.pop(name)


def _reordered():
    torch.manual_seed(0)
    return ReorderedSTARFlow(tiny_config(num_classes=10))


def _unclipped(out_dir):
    """The runs into another parameter order do not clip gradients: ``clip_grad_norm_`` sums the per-parameter
    norms in ``parameters()`` order, so another order moves the norm by a rounding step (measured: 1.5244057
    vs 1.5244058 at step 5), and with clipping active the weights then differ in the last bits whatever the
    checkpoint holds. Unclipped, the scale is exactly 1 and the runs must agree bit for bit."""
    return _cfg(out_dir, grad_clip=1e9)


@pytest.fixture(scope="module")
def full_and_cut(tmp_path_factory, digits):
    """An uninterrupted 8-step run, and a run of the same model cut at step 5 (its last checkpoint: step 4)."""
    root = tmp_path_factory.mktemp("reorder")
    full = Trainer(_model(), digits, _unclipped(root / "full"))
    full.train()
    mp = pytest.MonkeyPatch()
    try:
        _crash_at_step_5(Trainer(_model(), digits, _unclipped(root / "cut")), mp)
    finally:
        mp.undo()
    return full, root / "full", root / "cut"


def _copy_of_cut(full_and_cut, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(full_and_cut[2], out)
    return out, os.path.join(out, "checkpoints", "step_0000004")


def _drop_param_names(path):
    """Make ``path`` look like a checkpoint written before the parameter names were recorded."""
    manifest = ckpt.read_manifest(path)
    del manifest["optimizer"]["param_names"], manifest["manifest_sha256"]
    manifest["manifest_sha256"] = ckpt.manifest_digest(manifest)
    with open(os.path.join(path, ckpt.MANIFEST), "w") as f:
        json.dump(manifest, f)


def test_resume_into_a_model_with_another_parameter_order_matches_the_uninterrupted_run(full_and_cut, tmp_path,
                                                                                      digits):
    # The premise: same names and shapes, another order, and shapes that differ position by position (so
    # matching the optimizer state by position crashed inside Adam, or gave a parameter another's moments).
    before, after = dict(_model().named_parameters()), dict(_reordered().named_parameters())
    assert list(before) != list(after) and sorted(before) == sorted(after)
    assert any(p.shape != q.shape for p, q in zip(before.values(), after.values()))
    out, path = _copy_of_cut(full_and_cut, tmp_path)
    assert ckpt.read_manifest(path)["optimizer"]["param_names"] == list(before)
    resumed = Trainer(_reordered(), digits, _unclipped(out))
    resumed.train(resume="auto")
    assert resumed.step == 8
    _assert_same_run(full_and_cut[0], full_and_cut[1], resumed, out)


def test_a_checkpoint_without_parameter_names_resumes_by_position_or_says_what_does_not_match(
        full_and_cut, tmp_path, digits):
    out, path = _copy_of_cut(full_and_cut, tmp_path)
    _drop_param_names(path)
    old_copy = tmp_path / "old"
    shutil.copytree(out, old_copy)
    # Into the model order that wrote it: by position, as before the names were recorded.
    same = Trainer(_model(), digits, _unclipped(old_copy))
    same.train(resume="auto")
    _assert_same_run(full_and_cut[0], full_and_cut[1], same, old_copy)
    # Into another order: a clear error naming the parameter, not a shape error inside Adam.
    with pytest.raises(CheckpointError, match=r"parameter 'blocks\.0\.[a-z_.0-9]+' \(#1 in order\).*"
                                                   r"record_param_names"):
        Trainer(_reordered(), digits, _unclipped(out)).train(resume="auto")
    # Given the names in the order of the code that wrote it (checked against its tensors), it resumes exactly.
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.record_param_names(path, [n for n, _ in _reordered().named_parameters()])
    with pytest.raises(CheckpointError, match="'blocks.9.gone' is not one of the checkpoint's parameters"):
        ckpt.record_param_names(path, ["blocks.9.gone"])
    ckpt.record_param_names(path, [n for n, _ in _model().named_parameters()])
    resumed = Trainer(_reordered(), digits, _unclipped(out))
    resumed.train(resume="auto")
    _assert_same_run(full_and_cut[0], full_and_cut[1], resumed, out)


def test_optimizer_state_names_a_parameter_it_cannot_place():
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1, 8, 8), y=torch.tensor([0, 1]))[0].sum().backward()
    opt.step()
    state = opt.state_dict()
    names = ckpt.optimizer_param_names(model, opt)
    renamed = ["blocks.9.gone" if n == names[3] else n for n in names]
    with pytest.raises(CheckpointError, match=f"{names[3]!r} has no optimizer state"):
        ckpt.match_optimizer_state(state, renamed, model, opt)
    shrunk = {**state, "state": {**state["state"], 3: {**state["state"][3], "exp_avg": torch.zeros(1)}}}
    with pytest.raises(CheckpointError, match=f"exp_avg for parameter {names[3]!r} has shape \\[1\\]"):
        ckpt.match_optimizer_state(shrunk, names, model, opt)


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
