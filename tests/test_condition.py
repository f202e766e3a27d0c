"""The one ``Condition``: every family reads it through ``cond=`` and gives exactly what the old keyword
form (``y=`` / ``text=`` / ``negative...=`` / ``source=``) gives."""
import pytest
import torch
from conftest import perturbed, tiny_config

import starflow
from starflow import Condition, STARFlow
from starflow.peers import FlowAR, FlowARConfig, RectifiedFlow, RectifiedFlowConfig
from starflow.tasks.editing import EditSTARFlow


def _text(batch, length=5, dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[0, -2:] = False
    return torch.randn(batch, length, dim, generator=g), mask, torch.randn(batch, 7, generator=g)


def test_condition_is_the_package_condition_and_carries_every_field():
    assert starflow.Condition is Condition
    states, mask, pooled = _text(2)
    c = Condition.from_args(torch.tensor([1, 2]), (states, mask, pooled))
    assert torch.equal(c.labels, torch.tensor([1, 2])) and c.text is states and c.text_mask is mask and c.pooled is pooled
    assert Condition.from_args(None, (states, mask)).pooled is None and Condition.from_args() is None
    assert Condition.from_args(text=c) is c
    src = torch.randn(2, 16, 12)
    c = Condition(text=states, text_mask=mask, pooled=pooled, source=src)
    both = c.cat(c.null())
    assert both.drop.tolist() == [False, False, True, True]
    assert torch.equal(both.source, torch.cat([src, src])) and both.pooled.shape == (4, 7)
    assert torch.equal(both.rows(slice(2, 4)).source, src)
    assert c.with_drop(torch.tensor([True, False])).drop.tolist() == [True, False]
    assert c.text_triple() == (states, mask, pooled)


def test_starflow_reads_cond_as_the_keyword_form():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(cond_dim=12, cond_drop_prob=0.2))).eval()
    states, mask, pooled = _text(2)
    cond = Condition(text=states, text_mask=mask, pooled=pooled)
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.log_prob(x, text=(states, mask)), model.log_prob(x, cond=cond))
    assert torch.equal(model.nll(x, text=(states, mask)), model.nll(x, cond=cond))
    z = torch.randn(2, 1, 8, 8)
    neg = _text(2, length=3, seed=1)
    old = model.inverse(z, text=(states, mask), guidance=2.0, negative_text=neg[:2])
    new = model.inverse(z, cond=cond, guidance=2.0, negative=Condition.from_args(text=neg))
    assert torch.equal(old, new)
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(model.sample(2, text=(states, mask), generator=g()), model.sample(2, cond=cond, generator=g()))
    # training: the drop mask given by the caller, through cond.drop or cond_drop, is the same dropout
    model.train()
    drop = torch.tensor([True, False])
    a = model.loss(x, text=(states, mask), cond_drop=drop)
    assert torch.equal(a, model.loss(x, cond=cond, cond_drop=drop))
    assert torch.equal(a, model.loss(x, cond=cond.with_drop(drop), cond_drop=torch.zeros(2, dtype=torch.bool)))
    with pytest.raises(ValueError, match="either"):
        model.log_prob(x, text=(states, mask), cond=cond)
    with pytest.raises(ValueError, match="either"):
        model.inverse(z, cond=cond, guidance=1.0, negative=cond, negative_text=neg)


@pytest.mark.parametrize("family", ["rectified-flow", "flowar"])
def test_peers_read_cond_as_the_keyword_form(family):
    torch.manual_seed(0)
    if family == "rectified-flow":
        model = RectifiedFlow(RectifiedFlowConfig(in_channels=1, image_size=4, patch_size=2, width=16, depth=1, heads=2,
                                                  cond_dim=12, pooled_dim=7, sample_steps=2))
    else:
        model = FlowAR(FlowARConfig(in_channels=1, image_size=4, scales=(1, 2, 4), width=16, depth=1, heads=2,
                                    head_width=16, head_depth=1, head_heads=2, cond_dim=12, pooled_dim=7, sample_steps=2))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    model.eval()
    text, neg = _text(2), _text(2, length=3, seed=1)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    old = model.sample(2, text=text, guidance=1.5, generator=g(), negative=neg)
    new = model.sample(2, cond=Condition.from_args(text=text), guidance=1.5, generator=g(),
                       negative=Condition.from_args(text=neg))
    assert torch.equal(old, new)
    x = torch.randn(2, 1, 4, 4)
    model.train()
    torch.manual_seed(1)
    a = model.loss(x, text=text, generator=g())
    torch.manual_seed(1)
    assert torch.equal(a, model.loss(x, cond=Condition.from_args(text=text), generator=g()))
    # a drop mask carried by the condition is honoured (in eval mode nothing else is drawn): all dropped = null
    model.eval()
    all_dropped = model.loss(x, cond=Condition.from_args(text=text).with_drop(torch.ones(2, dtype=torch.bool)),
                             generator=g())
    null_only = model.loss(x, generator=g())
    assert torch.allclose(all_dropped, null_only, atol=1e-6)


def test_edit_model_reads_the_source_as_a_condition_field():
    torch.manual_seed(0)
    model = perturbed(EditSTARFlow(tiny_config(in_channels=3, cond_dim=12, num_blocks=2)), 0.05, seed=3).eval()
    states, mask, _ = _text(2)
    x, src = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    cond = Condition(text=states, text_mask=mask, source=src)
    assert torch.equal(model.log_prob(x, text=(states, mask), source=src), model.log_prob(x, cond=cond))
    z = torch.randn(2, 3, 8, 8)
    assert torch.equal(model.inverse(z, text=(states, mask), source=src, guidance=1.0),
                       model.inverse(z, cond=cond, guidance=1.0))
    model.train()
    drop = torch.tensor([False, True])
    assert torch.equal(model.loss(x, text=(states, mask), source=src, cond_drop=drop), model.loss(x, cond=cond, cond_drop=drop))
    with pytest.raises(ValueError, match="once"):
        model.log_prob(x, cond=Condition(text=states, text_mask=mask, source=model.patchify(src)), source=src)


def test_source_prefix_is_a_config_flag_not_a_class_swap():
    torch.manual_seed(0)
    cfg = tiny_config(in_channels=3, cond_dim=12, num_blocks=2, source_prefix=True)
    flow = perturbed(STARFlow(cfg), 0.05, seed=3).eval()
    edit = EditSTARFlow(tiny_config(in_channels=3, cond_dim=12, num_blocks=2))
    assert edit.config.source_prefix and type(edit.blocks[-1]) is type(flow.blocks[-1])
    edit.load_state_dict(flow.state_dict())
    edit.eval()
    states, mask, _ = _text(2)
    x, src = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    cond = Condition(text=states, text_mask=mask, source=src)
    # a plain STARFlow with the flag reads Condition.source exactly as the edit model reads source=
    assert torch.equal(flow.log_prob(x, cond=cond), edit.log_prob(x, text=(states, mask), source=src))
    with pytest.raises(ValueError, match="source"):
        flow.log_prob(x, text=(states, mask))
