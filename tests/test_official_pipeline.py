"""A text model built like the released STARFlow (no learned null, zero-padded attended prefix) runs through
the pipeline and ``starflow generate``: guidance's negative is the encoded empty prompt by default."""
import pytest
import torch
from PIL import Image

from conftest import perturbed
from starflow import FlowConfig, STARFlow
from starflow.cli import main
from starflow.pipeline import StarflowPipeline

OFFICIAL = dict(positions="rope", start_token=True, scale="softplus", soft_clip=4.0, final_norm=True, seq_order="L2R",
                learned_null=False, cond_drop_prob=0.0, text_padding="attend")


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    from starflow.components.text_encoder import TextEncoder

    torch.manual_seed(0)
    cfg = FlowConfig(in_channels=3, image_size=16, patch_size=4, width=64, head_dim=32, num_blocks=2,
                     layers_per_block=1, deep_layers=1, cond_dim=384, max_text_tokens=8, **OFFICIAL)
    out = str(tmp_path_factory.mktemp("official"))
    StarflowPipeline(perturbed(STARFlow(cfg), scale=0.02), None, TextEncoder.from_pretrained("minilm", max_length=8),
                     denoise="none").save_pretrained(out)
    return out


def test_empty_prompt_is_the_default_negative(pipeline_dir):
    pipe = StarflowPipeline.from_pretrained(pipeline_dir)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    a = pipe.sample(2, prompt="a red circle", guidance=2.0, generator=g())
    text = pipe.encode_prompts(["a red circle"] * 2)
    empty = pipe.encode_prompts(["", ""], allow_empty=True)
    b = pipe.finish(pipe.model.sample(2, text=text, negative_text=empty, guidance=2.0, generator=g()))
    assert torch.equal(a, b)
    c = pipe.sample(2, prompt="a red circle", guidance=2.0, negative_prompt="blue squares", generator=g())
    assert not torch.equal(a, c)
    with pytest.raises(ValueError, match="no learned null"):
        pipe.model.sample(1, guidance=2.0)


def test_generate_cli_runs_the_official_layout(pipeline_dir, tmp_path):
    out = str(tmp_path / "g.png")
    assert main(["generate", "--model", pipeline_dir, "--prompt", "a green square", "-n", "2", "--guidance", "2",
                 "--out", out]) == 0
    assert Image.open(out).mode == "RGB"


def test_prefix_is_zero_padded_to_max_text_tokens(pipeline_dir):
    model = StarflowPipeline.from_pretrained(pipeline_dir).model
    short = torch.randn(1, 3, 384)
    padded = torch.cat([short, torch.zeros(1, 5, 384)], dim=1)
    mask = torch.tensor([[True, True, False]])
    cond = model.make_condition(1, text=(short, mask))
    assert cond.text.shape == (1, 8, 384) and cond.text_mask is None and cond.text[0, 2:].abs().sum() == 0
    z = torch.randn(1, 3, 16, 16)
    same = model.inverse(z, text=(padded[:, :2], None))
    torch.testing.assert_close(model.inverse(z, text=(short, mask)), same, atol=0, rtol=0)
