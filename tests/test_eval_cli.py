"""``starflow eval`` with stand-in models (so this does not depend on the real model code)."""
from __future__ import annotations

import argparse
import json
import sys
import types
from dataclasses import dataclass

import pytest
import torch

from starflow.evaluation.report import SCHEMA, validate_report



@pytest.fixture(scope="module")
def mnist_train():
    from starflow.data import DigitsDataset

    return DigitsDataset("mnist", "train")


@dataclass
class _Cfg:
    num_classes: int = 10


class RealDigitsModel(torch.nn.Module):
    """'Samples' real train digits of the requested class: a model that matches the data exactly."""

    def __init__(self, ds, num_classes=10, shape=None, with_nll=True):
        super().__init__()
        self.config = _Cfg(num_classes)
        self.images, self.labels = ds.images, ds.labels
        self.shape = shape
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.calls = []
        if not with_nll:
            self.nll = None  # no likelihood: "n/a"

    def sample(self, n, y=None, generator=None):
        self.calls.append((n, None if y is None else y.tolist()))
        if y is None:
            idx = torch.randint(0, len(self.images), (n,), generator=generator)
        else:
            idx = torch.stack([
                torch.nonzero(self.labels == int(c)).flatten()[
                    torch.randint(0, int((self.labels == int(c)).sum()), (1,), generator=generator)][0]
                for c in y])
        x = self.images[idx].float() / 127.5 - 1
        if self.shape is not None:
            x = torch.zeros(n, *self.shape)
        return x

    def nll(self, x, y=None):
        assert x.min() >= -1 and x.max() <= 1
        return 1.0 + x.flatten(1).mean(1)  # per-example nats/dim

    def bits_per_dim(self, images, y=None):
        raise NotImplementedError("stand-in has no pixel likelihood")


def _run_cli(monkeypatch, model, argv):
    from starflow.cli import eval as eval_cli

    fake = types.ModuleType("starflow.pipeline")
    fake.load_pretrained = lambda path, *a, **k: model
    monkeypatch.setitem(sys.modules, "starflow.pipeline", fake)
    parser = argparse.ArgumentParser(prog="starflow")
    sub = parser.add_subparsers(dest="command", required=True)
    p = eval_cli.add_parser(sub, "eval")
    assert isinstance(p, argparse.ArgumentParser)
    args = parser.parse_args(["eval", *argv])
    return eval_cli.run(args)


def test_eval_is_registered():
    from starflow.cli import COMMANDS

    assert COMMANDS.get("eval") == "eval"


def test_eval_cli_writes_documented_schema(monkeypatch, tmp_path, mnist_train, capsys):
    model = RealDigitsModel(mnist_train)
    out = tmp_path / "results.json"
    rc = _run_cli(monkeypatch, model, [
        "ckpt-dir", "--metrics", "fd,pr,acc,nll", "--num-samples", "40", "--dataset", "mnist",
        "--out", str(out), "--feature-size", "64", "--cache-dir", str(tmp_path / "cache"), "--nll-max", "60",
        "--batch-size", "16", "--device", "cpu"])
    assert rc == 0
    report = json.loads(out.read_text())
    validate_report(report)
    assert report["schema"] == SCHEMA and report["checkpoint"] == "ckpt-dir" and report["num_samples"] == 40
    assert report["model"] == {"class": "RealDigitsModel", "num_classes": 10, "conditional": True}
    # class-balanced labels, sampled in batches of 16
    assert [n for n, _ in model.calls] == [16, 16, 8]
    assert model.calls[0][1][:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]

    fd = report["metrics"]["fd"]
    assert fd["status"] == "ok" and fd["name"] == "FD-EffNetLite0"
    assert fd["n_gen"] == 40 and fd["n_ref"] == 500 and fd["feature_dim"] == 1280
    assert fd["singular_covariance"] is True and fd["value"] > 0
    assert fd["real_baseline"]["n_real"] == 40 and fd["real_baseline"]["split"] == "train"
    # the model returns real digits, so it scores like the real baseline (same n)
    assert abs(fd["value"] - fd["real_baseline"]["value"]) < 0.5 * fd["real_baseline"]["value"]
    assert report["feature_extractor"] == {"name": "effnetlite0-64", "metric": "FD-EffNetLite0", "dim": 1280,
                                           "image_size": 64}

    pr = report["metrics"]["pr"]
    assert pr["status"] == "ok" and 0 <= pr["precision"] <= 1 and 0 <= pr["recall"] <= 1 and pr["k"] == 3
    acc = report["metrics"]["acc"]
    assert acc["status"] == "ok" and acc["n"] == 40 and acc["accuracy"] >= 0.9
    assert acc["classifier_test_accuracy"] >= 0.98

    nll = report["metrics"]["nll"]
    assert nll["status"] == "ok" and nll["conditioned_on_labels"] is True
    s = nll["nats_per_dim"]
    assert s["n"] == 60 and s["unit"] == "nats/dim" and s["ci95"][0] < s["mean"] < s["ci95"][1]
    assert nll["bits_per_dim"] is None and "not implemented" in nll["reasons"]["bits_per_dim"]
    assert any("singular" in w for w in report["warnings"])

    printed = capsys.readouterr().out
    assert "FD-EffNetLite0" in printed and "n/a" in printed and "95% CI" in printed


def test_eval_unconditional_without_likelihood_reports_na(monkeypatch, tmp_path, mnist_train):
    model = RealDigitsModel(mnist_train, num_classes=0, with_nll=False)
    out = tmp_path / "r.json"
    _run_cli(monkeypatch, model, ["ck", "--metrics", "acc,nll", "--num-samples", "8", "--out", str(out)])
    report = json.loads(out.read_text())
    validate_report(report)
    assert model.calls == [(8, None)]
    assert report["metrics"]["acc"]["status"] == "n/a" and "not class-conditional" in report["metrics"]["acc"]["reason"]
    nll = report["metrics"]["nll"]
    assert nll["status"] == "n/a" and "no nll()" in nll["reason"] and "fd" not in report["metrics"]


@pytest.mark.parametrize("shape", [(3, 28, 28), (1, 32, 32)])
def test_eval_rejects_mismatched_sample_shapes(monkeypatch, tmp_path, mnist_train, shape):
    model = RealDigitsModel(mnist_train, shape=shape)
    with pytest.raises(ValueError, match="mismatch"):
        _run_cli(monkeypatch, model, ["ck", "--metrics", "acc", "--num-samples", "4"])


def test_eval_rejects_bad_arguments(monkeypatch, mnist_train):
    model = RealDigitsModel(mnist_train)
    with pytest.raises(ValueError, match=">= 2"):
        _run_cli(monkeypatch, model, ["ck", "--metrics", "fd", "--num-samples", "1"])
    with pytest.raises(ValueError, match="unknown metric"):
        _run_cli(monkeypatch, model, ["ck", "--metrics", "fd,fidd"])
    with pytest.raises(ValueError, match="inception-weights"):
        _run_cli(monkeypatch, model, ["ck", "--metrics", "fid", "--num-samples", "4"])


def test_validate_report_catches_schema_violations():
    good = {"schema": SCHEMA, "checkpoint": "c", "dataset": "mnist", "reference_split": "test", "num_samples": 2,
            "seed": 0, "device": "cpu", "created": "t", "model": {}, "sample_kwargs": {}, "timing_s": {},
            "warnings": [], "metrics": {"acc": {"status": "n/a", "reason": "unconditional"}},
            "feature_extractor": None}
    validate_report(good)
    with pytest.raises(ValueError, match="without a reason"):
        validate_report({**good, "metrics": {"acc": {"status": "n/a"}}})
    with pytest.raises(ValueError, match="lacks"):
        validate_report({**good, "metrics": {"fd": {"status": "ok", "value": 1.0}}})
    with pytest.raises(ValueError, match="lacks 'seed'"):
        validate_report({k: v for k, v in good.items() if k != "seed"})


def test_eval_samples_at_the_models_stored_settings_unless_told(monkeypatch, tmp_path, mnist_train, capsys):
    """`starflow eval` scores what `starflow generate` draws: the model's stored sampling settings, each
    overridable with --sample-arg."""
    model = RealDigitsModel(mnist_train)
    seen = []
    model.sampling = {"temperature": 0.5}

    def sample(n, y=None, generator=None, temperature=1.0):
        seen.append(temperature)
        return RealDigitsModel.sample(model, n, y, generator)

    model.sample = sample
    out = tmp_path / "r.json"
    args = ["m", "--metrics", "acc", "--num-samples", "20", "--quiet", "--out", str(out)]
    assert _run_cli(monkeypatch, model, args) == 0
    assert set(seen) == {0.5} and json.loads(out.read_text())["sample_kwargs"] == {"temperature": 0.5}
    assert "sampled with temperature=0.5" in capsys.readouterr().out
    seen.clear()
    assert _run_cli(monkeypatch, model, args + ["--sample-arg", "temperature=1.0"]) == 0
    assert set(seen) == {1.0} and json.loads(out.read_text())["sample_kwargs"] == {"temperature": 1.0}
