"""Bad input gets an error that names the problem."""
import pytest
import torch

from conftest import tiny_config
from starflow import FlowConfig, STARFlow
from starflow.errors import ConfigError
from starflow.train.recipe import load_run_config


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="width: 100 is not divisible by head_dim 32"):
        FlowConfig(width=100, head_dim=32)
    with pytest.raises(ConfigError, match="image_size"):
        FlowConfig(image_size=30, patch_size=4)
    with pytest.raises(ConfigError, match="cond_mode"):
        FlowConfig(cond_mode="concat")


def test_yaml_unknown_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  widht: 64\n")
    with pytest.raises(ConfigError, match="unknown field.*widht"):
        load_run_config(str(path))


def test_wrong_image_shape_and_labels():
    model = STARFlow(tiny_config(num_classes=3)).eval()
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 8, 8\], got \[2, 3, 8, 8\]"):
        model(torch.randn(2, 3, 8, 8), y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"class index 5 out of range \[0, 3\)"):
        model(torch.randn(2, 1, 8, 8), y=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="class index -1"):
        model.sample(2, y=torch.tensor([-1, 0]))
    uncond = STARFlow(tiny_config())
    with pytest.raises(ValueError, match="unconditional"):
        uncond(torch.randn(1, 1, 8, 8), y=torch.tensor([0]))


def test_sampling_argument_errors():
    model = STARFlow(tiny_config(num_classes=3)).eval()
    with pytest.raises(ValueError, match="guidance weight"):
        model.sample(1, y=0, guidance=-1.0)
    with pytest.raises(ValueError, match="guidance weight"):
        model.sample(1, y=0, guidance=float("nan"))
    with pytest.raises(ValueError, match="unknown guidance rule 'cfg'"):
        model.sample(1, y=0, guidance=1.0, guidance_rule="cfg")
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        model.sample(1, y=0, sampler="euler")
    with pytest.raises(ValueError, match="temperature"):
        model.sample(1, y=0, temperature=0.0)
    with pytest.raises(ValueError, match="number of samples"):
        model.sample(0)
