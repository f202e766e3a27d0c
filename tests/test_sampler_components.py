"""Samplers as typed pipeline components: ``FlowSampler`` for STARFlow, ``EulerSampler`` for the rectified
flow and FlowAR; the old string / keyword form gives the same samples."""
import dataclasses

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


def _sd3_grid_by_hand(steps: int, shift: float) -> list[float]:
    """SD3's sigma grid, step by step: the training sigmas t = 1/1000 ... 1 shifted by
    s(t) = shift t / (1 + (shift - 1) t) give the range [s(1/1000), 1]; ``steps`` points evenly spaced over it
    are shifted again, and 0 ends the grid."""
    s = lambda t: shift * t / (1 + (shift - 1) * t)  # noqa: E731
    low = s(1 / 1000)
    even = [1 + (low - 1) * i / (steps - 1) for i in range(steps)]
    return [s(t) for t in even] + [0.0]


def _velocity_times(rf, sample) -> list[float]:
    """The t values ``sample()`` calls the velocity at: the grid without its final 0."""
    seen, real = [], rf.velocity

    def spy(z, t, cond):
        seen.append(t[0].item())
        return real(z, t, cond)

    rf.velocity = spy
    try:
        sample()
    finally:
        del rf.velocity
    return seen


def test_euler_sampler_shift_and_steps_set_per_call_give_the_sd3_grid():
    torch.manual_seed(0)
    cfg = RectifiedFlowConfig(in_channels=1, image_size=4, patch_size=2, width=16, depth=1, heads=2, num_classes=3,
                              sample_steps=4)
    rf = RectifiedFlow(cfg).eval()
    y = torch.tensor([0, 2])
    grid = _sd3_grid_by_hand(3, 3.0)
    assert grid[:3] == pytest.approx([1.0, 0.7511210762, 0.0089285714])  # the same numbers, written out
    # The pipeline's component sets other steps, schedule and shift; the call's own keywords win ...
    pipe = StarflowPipeline(rf, sampler=EulerSampler(steps=5, schedule="uniform", shift=2.0))
    plain = StarflowPipeline(rf)
    call = dict(steps=3, shift=3.0, schedule="sd3")
    times = _velocity_times(rf, lambda: pipe.sample(2, y=y, generator=g(), **call))
    assert times == pytest.approx(grid[:-1], rel=1e-6)
    by_grid = plain.sample(2, y=y, generator=g(), sigmas=torch.tensor(grid))
    assert (pipe.sample(2, y=y, generator=g(), **call) - by_grid).abs().max() < 1e-5
    # ... as do a call's sampler object, the component itself, and the keyword form on the model.
    for sample in (lambda: plain.sample(2, y=y, generator=g(), sampler=EulerSampler(steps=3, shift=3.0)),
                   lambda: StarflowPipeline(rf, sampler=EulerSampler(steps=3, shift=3.0)).sample(2, y=y, generator=g()),
                   lambda: rf.sample(2, y=y, generator=g(), steps=3, shift=3.0)):
        assert _velocity_times(rf, sample) == times
    # Without a shift the config's (1.0 here) shapes the grid; the component's steps stay when a call sets none.
    assert _velocity_times(rf, lambda: plain.sample(2, y=y, steps=3)) == pytest.approx([1.0, 0.5005, 0.001], rel=1e-6)
    only_shift = _velocity_times(rf, lambda: StarflowPipeline(rf, sampler=EulerSampler(steps=3)).sample(2, y=y, shift=3.0))
    assert only_shift == times
    # A static shift given per call replaces dynamic shifting from the config.
    dynamic = RectifiedFlow(dataclasses.replace(cfg, dynamic_shift=True)).eval()
    assert _velocity_times(dynamic, lambda: dynamic.sample(2, y=y, steps=3)) != pytest.approx(grid[:-1], rel=1e-6)
    assert _velocity_times(dynamic, lambda: dynamic.sample(2, y=y, steps=3, shift=3.0)) == times
    # Contradictions are refused.
    with pytest.raises(ValueError, match="shift"):
        EulerSampler(shift=0.0)
    with pytest.raises(ValueError, match="not both"):
        EulerSampler(shift=3.0, mu=0.5)
    with pytest.raises(ValueError, match="not both"):
        rf.sample(2, y=y, shift=3.0, sampler=EulerSampler(steps=2))
    with pytest.raises(ValueError, match="neither sigmas nor mu"):
        rf.sample(2, y=y, shift=3.0, mu=0.5)
    ar = FlowAR(FlowARConfig(in_channels=1, image_size=4, scales=(1, 2, 4), width=16, depth=1, heads=2, head_width=16,
                             head_depth=1, head_heads=2, num_classes=3, sample_steps=2)).eval()
    with pytest.raises(ValueError, match="steps only"):
        ar.sample(2, y=y, sampler=EulerSampler(shift=3.0))
