"""Samplers as typed pipeline components: ``FlowSampler`` for STARFlow, ``EulerSampler`` for the rectified
flow and FlowAR; the old string / keyword form gives the same samples."""
import pytest
import torch
from conftest import perturbed, tiny_config

from starflow import STARFlow
from starflow.flow import samplers
from starflow.flow.samplers import SAMPLERS, EulerSampler, FlowSampler
from starflow.peers import FlowAR, FlowARConfig, RectifiedFlow, RectifiedFlowConfig
from starflow.peers import rectified_flow
from starflow.pipeline import StarflowPipeline


def g():
    return torch.Generator().manual_seed(7)


def test_sampler_options_are_checked_against_the_one_list_of_names():
    assert rectified_flow.SAMPLERS is samplers.EULER_SAMPLERS
    for kind in SAMPLERS:
        assert FlowSampler(kind).inverse_kwargs()["sampler"] == kind
    with pytest.raises(ValueError, match="unknown sampler"):
        FlowSampler("fast")
    with pytest.raises(ValueError, match="threshold"):
        FlowSampler("jacobi", threshold=0.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        EulerSampler(backend="heun")
    with pytest.raises(ValueError, match="steps"):
        EulerSampler(steps=0)


def test_flow_sampler_component_equals_the_keyword_form():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=3))).eval()
    y = torch.tensor([0, 1])
    old = model.sample(2, y=y, generator=g(), sampler="jacobi", jacobi_threshold=1e-2, jacobi_window=4)
    new = model.sample(2, y=y, generator=g(), sampler=FlowSampler("jacobi", threshold=1e-2, window=4))
    assert torch.equal(old, new)
    planned = FlowSampler("jacobi", plan=("jacobi:4", "jacobi", "sequential"), threshold=1e-9)
    z = torch.randn(2, 1, 8, 8)
    _, stats = model.inverse(z, y, sampler=planned, return_stats=True)
    assert stats.plan == ["jacobi:4", "jacobi", "sequential"]
    with pytest.raises(ValueError, match="not both"):
        model.inverse(z, y, sampler=FlowSampler("jacobi"), jacobi_threshold=1e-4)
    # the pipeline holds a sampler component; a call's own sampler wins
    pipe = StarflowPipeline(model, sampler=FlowSampler("jacobi", threshold=1e-2, window=4))
    plain = StarflowPipeline(model)
    assert torch.equal(pipe.sample(2, y=y, generator=g()),
                       plain.sample(2, y=y, generator=g(), sampler="jacobi", jacobi_threshold=1e-2, jacobi_window=4))
    assert torch.equal(pipe.sample(2, y=y, generator=g(), sampler="sequential"), plain.sample(2, y=y, generator=g()))


def test_euler_sampler_component_equals_the_keyword_form():
    torch.manual_seed(0)
    rf = RectifiedFlow(RectifiedFlowConfig(in_channels=1, image_size=4, patch_size=2, width=16, depth=1, heads=2,
                                           num_classes=3, sample_steps=4)).eval()
    y = torch.tensor([0, 2])
    old = rf.sample(2, y=y, generator=g(), steps=2, schedule="uniform")
    assert torch.equal(old, rf.sample(2, y=y, generator=g(), sampler=EulerSampler(steps=2, schedule="uniform")))
    assert torch.equal(StarflowPipeline(rf, sampler=EulerSampler(steps=2, schedule="uniform")).sample(2, y=y, generator=g()),
                       StarflowPipeline(rf).sample(2, y=y, generator=g(), steps=2, schedule="uniform"))
    with pytest.raises(ValueError, match="not both"):
        rf.sample(2, y=y, steps=3, sampler=EulerSampler(steps=2))
    ar = FlowAR(FlowARConfig(in_channels=1, image_size=4, scales=(1, 2, 4), width=16, depth=1, heads=2, head_width=16,
                             head_depth=1, head_heads=2, num_classes=3, sample_steps=2)).eval()
    assert torch.equal(ar.sample(2, y=y, generator=g(), steps=(1, 2, 1)),
                       ar.sample(2, y=y, generator=g(), sampler=EulerSampler(steps=(1, 2, 1))))
    with pytest.raises(ValueError, match="steps only"):
        ar.sample(2, y=y, sampler=EulerSampler(schedule="uniform"))
