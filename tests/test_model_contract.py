"""Every registered model family passes the same contract, through the project's own trainer.

Per ``model_type``: build a tiny config, train a few steps on scikit-learn's 8x8 digits with
``starflow.train``, export, load (pipeline and bare class), sample reproducibly, save again and reload
to the same samples; for likelihood models also the exact round trip and the NLL identities.
A family registered without a tiny config here fails the test, so none is left out. A family that needs
more than class labels (the edit model: a source image) gets it through ``EXTRA``, which every train,
sample and likelihood call adds to its condition.
"""
import json
import math
import os

import pytest
import torch

import starflow
from starflow.flow.condition import Condition
from starflow.flow.config import FlowConfig
from starflow.flow.edit import EditSTARFlow
from starflow.io.hub import read_config
from starflow.train.config import TrainConfig
from starflow.train.recipe import RunConfig
from starflow.models import MODEL_TYPES, model_class, model_types, register
from starflow.peers import FlowARConfig, RectifiedFlowConfig
from starflow.pipeline import StarflowPipeline
from starflow.protocols import GenerativeModel, LikelihoodModel
from starflow.train.build import build_trainer

STEPS = 3

# model_type -> a tiny class-conditional config for 1x8x8 images (the digits dataset)
TINY = {
    "starflow": lambda: FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2,
                                   layers_per_block=1, deep_layers=1, num_classes=10),
    "rectified-flow": lambda: RectifiedFlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, depth=1,
                                                  heads=2, num_classes=10, sample_steps=3),
    "flowar": lambda: FlowARConfig(in_channels=1, image_size=8, scales=(2, 4, 8), width=32, depth=1, heads=2,
                                   head_width=32, head_depth=1, head_heads=2, num_classes=10, sample_steps=2),
    "starflow-edit": lambda: FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16,
                                        num_blocks=2, layers_per_block=1, deep_layers=1, num_classes=10,
                                        source_prefix=True),
}

# A tiny source-conditioned task for the edit model: the source of an example is a fixed random image of
# its class (model space), so the source is a function of the label the trainer hands to condition_fn.
SOURCES = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1

# model_type -> labels -> extra keyword arguments for loss / sample / forward / inverse / nll / log_prob
EXTRA = {
    "starflow-edit": lambda y: {"source": SOURCES[y.cpu()].to(y.device)},
}


def _extra(model_type: str, y: torch.Tensor) -> dict:
    return EXTRA[model_type](y) if model_type in EXTRA else {}


def _sample(model, seed: int = 0, **extra) -> torch.Tensor:
    return model.sample(3, y=torch.tensor([0, 4, 9]), generator=torch.Generator().manual_seed(seed), **extra)


@pytest.mark.parametrize("model_type", model_types())
def test_model_family_contract(model_type, tmp_path):
    if model_type not in TINY:
        pytest.fail(f"registered model_type {model_type!r} has no tiny config in this contract test")
    out = str(tmp_path / "run")
    train = TrainConfig(dataset="digits", out_dir=out, steps=STEPS, batch_size=16, warmup_steps=1, log_every=1,
                        ckpt_every=STEPS, sample_every=STEPS, device="cpu", seed=0)
    trainer = build_trainer(RunConfig(model_type, TINY[model_type](), train))
    if model_type in EXTRA:  # the condition the trainer builds from labels, plus the family's extra fields
        labels_only = trainer.condition_fn
        trainer.condition_fn = lambda y: {**labels_only(y), **_extra(model_type, y)}
        trainer.preview = {**trainer.preview, **_extra(model_type, trainer.preview["y"])}
    model = trainer.model
    cls = model_class(model_type)
    assert type(model) is cls and model.model_type == model_type
    assert isinstance(model, GenerativeModel)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    # ---- train a few steps through the trainer, which exports a pipeline directory
    exported = trainer.train()
    assert trainer.step == STEPS
    with open(os.path.join(out, "log.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items()), "training changed no weight"

    # ---- load: the pipeline and the bare class read the same weights
    pipe = StarflowPipeline.from_pretrained(exported)
    loaded = pipe.model
    assert type(loaded) is cls and isinstance(loaded, GenerativeModel) and loaded.config == model.config
    bare = cls.from_pretrained(os.path.join(exported, "model"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, bare.state_dict()[k]), k

    # ---- sample: model space of the right shape, reproducible for a seed
    extra = _extra(model_type, torch.tensor([0, 4, 9]))
    x = _sample(loaded, **extra)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, _sample(loaded, **extra)) and not torch.equal(x, _sample(loaded, seed=1, **extra))
    images = pipe.sample(3, y=torch.tensor([0, 4, 9]), generator=torch.Generator().manual_seed(0), **extra)
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1

    # ---- save again and reload: the same samples
    again = str(tmp_path / "again")
    loaded.save_pretrained(again)
    assert torch.equal(_sample(cls.from_pretrained(again), **extra), x)

    # ---- likelihood models: exact inverse and consistent NLL; the others say they have none
    data = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    extra = _extra(model_type, y)
    if isinstance(loaded, LikelihoodModel):
        xs = data.float() / 127.5 - 1
        with torch.no_grad():
            z, logdet = loaded(xs, y, **extra)
            back = loaded.inverse(z, y, **extra)
            nll = loaded.nll(xs, y, **extra)
            log_prob = loaded.log_prob(xs, y, **extra)
        assert z.shape == xs.shape and logdet.shape == (4,)
        assert (back - xs).abs().max().item() < 1e-4
        assert torch.isfinite(nll).all() and nll.shape == (4,)
        torch.testing.assert_close(nll, -log_prob / xs[0].numel())
        if extra:  # the pipeline's bits_per_dim takes labels only; the model takes the whole Condition
            bpd = loaded.bits_per_dim(data, generator=torch.Generator().manual_seed(0), cond=Condition(labels=y, **extra))
            assert bpd.shape == (4,) and torch.isfinite(bpd).all() and (bpd > 0).all()
            with torch.no_grad():  # the source is read: another source changes the likelihood
                other = loaded.nll(xs, y, **_extra(model_type, (y + 1) % 10))
            assert not torch.allclose(other, nll)
        else:
            bpd = loaded.bits_per_dim(data, y, generator=torch.Generator().manual_seed(0))
            assert bpd.shape == (4,) and torch.isfinite(bpd).all() and (bpd > 0).all()
            assert torch.equal(pipe.bits_per_dim(data, y, generator=torch.Generator().manual_seed(0)), bpd)
    else:
        with pytest.raises(NotImplementedError, match="no exact likelihood"):
            pipe.nll(data.float() / 127.5 - 1, y)


def test_every_shipped_family_is_registered():
    assert set(TINY) <= set(model_types())


def test_register_refuses_a_taken_name_and_a_malformed_target():
    register("starflow", MODEL_TYPES["starflow"])  # the same target again: allowed
    with pytest.raises(ValueError, match="already registered"):
        register("starflow", "starflow.peers.flowar:FlowAR")
    with pytest.raises(ValueError, match="module:Class"):
        register("new-family", "starflow.peers.flowar.FlowAR")
    assert "new-family" not in model_types()
    with pytest.raises(ValueError, match="unknown model_type"):
        model_class("no-such-family")


def test_the_shipped_edit_model_loads_by_its_model_type():
    directory = os.path.join(os.path.dirname(starflow.__file__), "assets", "starflow_edit", "model")
    model_type = read_config(directory)["model_type"]
    assert model_type == "starflow-edit" and model_class(model_type) is EditSTARFlow
    model = model_class(model_type).from_pretrained(directory)
    assert type(model) is EditSTARFlow and model.config.source_prefix
    assert isinstance(model, LikelihoodModel)
