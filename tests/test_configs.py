"""Every config validates through the shared schema checks, and a model config records its training noise."""
import json
import os

import pytest

from starflow.errors import ConfigError
from starflow.evaluation.classifier import DigitClassifierConfig
from starflow.flow.config import FlowConfig
from starflow.flow.model import STARFlow
from starflow.io.shipped import DEFAULT_DIGITS_MODEL
from starflow.peers import FlowARConfig, RectifiedFlowConfig
from starflow.train.autoencoder_trainer import AutoencoderTrainConfig, FinetuneConfig
from starflow.train.config import TrainConfig
from starflow.train.recipe import RunConfig, record_noise_std

TINY_FLOW = dict(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2, layers_per_block=1)
MODEL_CONFIGS = [lambda **kw: FlowConfig(**TINY_FLOW, **kw), lambda **kw: RectifiedFlowConfig(**kw),
                 lambda **kw: FlowARConfig(**kw)]


@pytest.mark.parametrize("cls, field", [(FlowConfig, "width"), (TrainConfig, "steps"), (RectifiedFlowConfig, "depth"),
                                        (FlowARConfig, "depth"), (AutoencoderTrainConfig, "steps"),
                                        (FinetuneConfig, "steps"), (DigitClassifierConfig, "width")])
def test_every_config_refuses_a_wrong_type_by_field_name(cls, field):
    with pytest.raises(ConfigError, match=f"^{field}: must be an integer, got '8' \\(str\\)"):
        cls(**{field: "8"})


@pytest.mark.parametrize("make", MODEL_CONFIGS)
def test_model_configs_record_the_training_noise(make):
    cfg = make()
    assert cfg.noise_std is None  # not recorded until a trainer says
    record_noise_std(cfg, TrainConfig(noise_std=0.1))
    assert cfg.noise_std == 0.1
    record_noise_std(cfg, TrainConfig(noise_std=0.1))  # the same value again is fine
    with pytest.raises(ConfigError, match="model.noise_std is 0.1 but train.noise_std is 0.0"):
        record_noise_std(cfg, TrainConfig())
    with pytest.raises(ConfigError, match="^noise_std: must be >= 0"):
        make(noise_std=-0.5)


def test_noise_std_is_saved_with_the_flow_and_old_folders_still_load(tmp_path):
    run = RunConfig("starflow", FlowConfig(**TINY_FLOW), TrainConfig(noise_std=0.05))
    record_noise_std(run.model, run.train)
    model = STARFlow(run.model)
    model.save_pretrained(str(tmp_path / "m"))
    assert STARFlow.from_pretrained(str(tmp_path / "m")).config.noise_std == 0.05
    # A folder saved before the field existed: loads, noise_std not recorded.
    cfg_path = tmp_path / "m" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["noise_std"]
    cfg_path.write_text(json.dumps(cfg))
    assert STARFlow.from_pretrained(str(tmp_path / "m")).config.noise_std is None
    # the shipped latent MNIST model records the σ it was trained with
    assert STARFlow.from_pretrained(os.path.join(DEFAULT_DIGITS_MODEL, "model")).config.noise_std == 0.07  # session 14 (RECIPE.md)
