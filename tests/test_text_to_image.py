"""Text-to-image end to end on a tiny model: captioned shapes + MiniLM -> train -> pipeline -> generate."""
import os

import pytest
import torch
from PIL import Image

from starflow.cli import main
from starflow.flow.config import FlowConfig
from starflow.train.config import TrainConfig
from starflow.train.recipe import RunConfig
from starflow.pipeline import StarflowPipeline
from starflow.train.build import build_trainer


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("t2i"))
    model = FlowConfig(in_channels=3, image_size=16, patch_size=4, width=32, head_dim=16, num_blocks=2,
                       layers_per_block=1, deep_layers=1, cond_dim=384)
    train = TrainConfig(dataset="shapes", image_size=16, dataset_size=64, text_encoder="minilm", out_dir=out,
                        steps=4, batch_size=16, warmup_steps=1, log_every=2, ckpt_every=4, sample_every=4, noise_std=0.05)
    trainer = build_trainer(RunConfig("starflow", model, train))
    return trainer.train()


def test_pipeline_saved_with_text_encoder(tiny_pipeline):
    pipe = StarflowPipeline.from_pretrained(tiny_pipeline)
    assert pipe.is_text_conditional and pipe.text_encoder.dim == 384
    images = pipe("two red circles above a blue square", num_images=2, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0))
    assert len(images) == 2 and images[0].size == (16, 16) and images[0].mode == "RGB"


def test_prompt_changes_the_sample(tiny_pipeline):
    pipe = StarflowPipeline.from_pretrained(tiny_pipeline)
    # the trained prefix is tiny, so compare raw flow outputs rather than pixels
    a = pipe.sample(1, prompt="a red circle", generator=torch.Generator().manual_seed(0))
    b = pipe.sample(1, prompt="three blue triangles", generator=torch.Generator().manual_seed(0))
    assert not torch.equal(a, b)


def test_generate_cli(tiny_pipeline, tmp_path, capsys):
    out = str(tmp_path / "g.png")
    assert main(["generate", "--model", tiny_pipeline, "--prompt", "a green square", "--num-images", "3",
                 "--seed", "1", "--guidance", "2", "--out", out]) == 0
    assert Image.open(out).mode == "RGB"
    folder = str(tmp_path / "many")
    assert main(["generate", "--model", tiny_pipeline, "--prompt", "a green square", "-n", "2", "--no-grid",
                 "--out", folder]) == 0
    assert len(os.listdir(folder)) == 2


@pytest.mark.parametrize("argv, message", [
    (["--prompt", "   "], "empty prompt"),
    (["--prompt", "a red circle", "--num-images", "0"], "--num-images"),
    (["--prompt", "a red circle", "--guidance", "-1"], "guidance weight"),
    (["--prompt", "a red circle", "--guidance", "nan"], "guidance weight"),
    (["--prompt", "a red circle", "--class", "3"], "not both"),
    ([], "text-conditional; pass --prompt"),
])
def test_generate_bad_input(tiny_pipeline, argv, message, capsys, tmp_path):
    assert main(["generate", "--model", tiny_pipeline, "--out", str(tmp_path / "x.png"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_over_long_prompt_truncates_with_warning(tiny_pipeline):
    pipe = StarflowPipeline.from_pretrained(tiny_pipeline)
    with pytest.warns(UserWarning, match="dropped"):
        pipe.sample(1, prompt=" ".join(["red circle"] * 40))
