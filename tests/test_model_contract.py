"""Every registered model family passes the same contract, through the project's own trainer.

Per ``model_type``: build a tiny config, train a few steps on scikit-learn's 8x8 digits with
``starflow.train``, export, load (pipeline and bare class), sample reproducibly, save again and reload
to the same samples; for likelihood models also the exact round trip and the NLL identities.
A family registered without a tiny config here fails the test, so none is left out.
"""
import json
import math
import os

import pytest
import torch

from starflow.flow.config import FlowConfig
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
}


def _sample(model, seed: int = 0) -> torch.Tensor:
    return model.sample(3, y=torch.tensor([0, 4, 9]), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("model_type", model_types())
def test_model_family_contract(model_type, tmp_path):
    if model_type not in TINY:
        pytest.fail(f"registered model_type {model_type!r} has no tiny config in this contract test")
    out = str(tmp_path / "run")
    train = TrainConfig(dataset="digits", out_dir=out, steps=STEPS, batch_size=16, warmup_steps=1, log_every=1,
                        ckpt_every=STEPS, sample_every=STEPS, device="cpu", seed=0)
    trainer = build_trainer(RunConfig(model_type, TINY[model_type](), train))
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
    x = _sample(loaded)
    assert x.shape == (3, 1, 8, 8) and torch.isfinite(x).all()
    assert torch.equal(x, _sample(loaded)) and not torch.equal(x, _sample(loaded, seed=1))
    images = pipe.sample(3, y=torch.tensor([0, 4, 9]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 8, 8) and images.min() >= -1 and images.max() <= 1

    # ---- save again and reload: the same samples
    again = str(tmp_path / "again")
    loaded.save_pretrained(again)
    assert torch.equal(_sample(cls.from_pretrained(again)), x)

    # ---- likelihood models: exact inverse and consistent NLL; the others say they have none
    data = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3, 4])
    if isinstance(loaded, LikelihoodModel):
        xs = data.float() / 127.5 - 1
        with torch.no_grad():
            z, logdet = loaded(xs, y)
            back = loaded.inverse(z, y)
            nll = loaded.nll(xs, y)
            log_prob = loaded.log_prob(xs, y)
        assert z.shape == xs.shape and logdet.shape == (4,)
        assert (back - xs).abs().max().item() < 1e-4
        assert torch.isfinite(nll).all() and nll.shape == (4,)
        torch.testing.assert_close(nll, -log_prob / xs[0].numel())
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
