"""Negative / unconditional conditioning for the peer families: `negative=` (a text triple such as the
encoded empty prompt) replaces the learned null in CFG sampling and in training-time dropping."""
import pytest
import torch

from starflow.cli import main
from starflow.flow.condition import Condition
from starflow.peers import FlowAR, FlowARConfig, RectifiedFlow, RectifiedFlowConfig


def make(kind: str, in_channels: int = 2, **kw):
    if kind == "rf":
        cfg = RectifiedFlowConfig(in_channels=in_channels, image_size=4, patch_size=2, width=16, depth=2, heads=2,
                                  sample_steps=3, **kw)
        model = RectifiedFlow(cfg)
    else:
        cfg = FlowARConfig(in_channels=2, image_size=4, scales=(1, 2, 4), width=16, depth=2, heads=2, head_width=16,
                           head_depth=1, head_heads=2, sample_steps=2, **kw)
        model = FlowAR(cfg)
    torch.manual_seed(3)
    with torch.no_grad():  # no zero-initialised layer may hide the condition's effect
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def prompt(batch, length, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 6, generator=g), None, None


def draw(model, n, **kw):
    return model.sample(n, generator=torch.Generator().manual_seed(0), **kw)


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_negative_equal_to_the_condition_cancels_guidance(kind):
    """v_u = v_c when the negative IS the condition, so any guidance weight gives the plain sample;
    with the learned null, guidance changes it."""
    model = make(kind, cond_dim=6)
    text = prompt(2, 4, seed=1)
    plain = draw(model, 2, text=text)
    assert (draw(model, 2, text=text, guidance=3.0, negative=text) - plain).abs().max() < 1e-5
    assert (draw(model, 2, text=text, guidance=3.0) - plain).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_one_negative_serves_every_row_and_padding_is_inert(kind):
    model = make(kind, cond_dim=6)
    text = prompt(3, 5, seed=1)
    states, _, _ = prompt(1, 2, seed=9)  # an "empty prompt" shorter than the condition
    once = draw(model, 3, text=text, guidance=2.0, negative=(states, None, None))
    per_row = draw(model, 3, text=text, guidance=2.0, negative=(states.expand(3, -1, -1), None, None))
    padded = (torch.cat([states, torch.randn(1, 4, 6)], 1), torch.tensor([[True, True] + [False] * 4]), None)
    assert torch.allclose(once, per_row, atol=1e-6)
    assert torch.allclose(once, draw(model, 3, text=text, guidance=2.0, negative=padded), atol=1e-5)
    learned = draw(model, 3, text=text, guidance=2.0)
    assert (once - learned).abs().max() > 1e-3


def test_dropped_rows_take_the_negative_and_kept_rows_the_condition():
    enc = make("rf", cond_dim=6).condition
    text, negative = prompt(3, 4, seed=1), prompt(1, 2, seed=2)
    cond = enc.dropped(3, None, text, torch.tensor([True, False, True]), negative)
    own, neg = enc(3, None, text), enc(1, None, negative)
    assert torch.equal(cond.tokens[1], own.tokens[1]) and torch.equal(cond.pooled[1], own.pooled[1])
    for row in (0, 2):
        assert torch.allclose(cond.tokens[row, :2], neg.tokens[0], atol=1e-6)
        assert torch.allclose(cond.pooled[row], neg.pooled[0], atol=1e-6)
        assert cond.mask[row].tolist() == [True, True, False, False]  # padding is masked out


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_training_drops_to_the_negative_when_given(kind):
    model = make(kind, cond_dim=6, cond_drop_prob=0.5).train()
    x = torch.randn(8, 2, 4, 4)
    text, negative = prompt(8, 3, seed=1), prompt(1, 2, seed=2)
    # the dropout mask comes on the condition, as the trainer draws it; the loss draws none itself
    cond = Condition.from_args(text=text).with_drop(torch.tensor([True, False] * 4))
    with_negative = model.loss(x, cond=cond, generator=torch.Generator().manual_seed(5), negative=negative)
    with_null = model.loss(x, cond=cond, generator=torch.Generator().manual_seed(5))
    assert (with_negative - with_null).abs() > 1e-6
    # without a mask nothing is dropped, so the negative is never read
    kept = model.loss(x, text=text, generator=torch.Generator().manual_seed(5), negative=negative)
    assert torch.equal(kept, model.loss(x, text=text, generator=torch.Generator().manual_seed(5)))


def test_negative_needs_a_text_conditional_model():
    model = make("rf", num_classes=3)
    with pytest.raises(ValueError, match="cond_dim=0"):
        draw(model, 2, y=torch.tensor([0, 1]), guidance=1.0, negative=prompt(1, 2, seed=0))


def test_sample_cli_hands_the_loop_to_diffusers(tmp_path, capsys):
    pytest.importorskip("diffusers")
    model = make("rf", in_channels=1, num_classes=3)
    model.save_pretrained(str(tmp_path / "rf"))
    png = str(tmp_path / "s.png")
    args = ["sample", str(tmp_path / "rf"), "-n", "2", "--sampler", "diffusers", "--guidance", "1", "--out", png]
    assert main(args) == 0
    ours = draw(model, 2, y=torch.tensor([0, 1]), guidance=1.0)
    theirs = draw(model, 2, y=torch.tensor([0, 1]), guidance=1.0, sampler="diffusers")
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert main(["sample", str(tmp_path / "rf"), "--sampler", "jacobi", "--out", png]) == 2
    assert "jacobi" in capsys.readouterr().err
