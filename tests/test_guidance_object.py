"""Guidance as one typed value that owns the batch doubling and the combining; sampling statistics are
returned, not kept on the model."""
import pytest
import torch
from conftest import perturbed, tiny_config

from starflow import Condition, STARFlow
from starflow.flow.guidance import Guidance, guide, guidance_weight


def test_guidance_object_doubles_and_combines_like_the_rule():
    g = Guidance(1.5, "tarflow")
    assert g.active and not Guidance().active and guidance_weight(g) == 1.5 and guidance_weight(2.0) == 2.0
    assert Guidance.of(g) is g and Guidance.of(2.0, "tarflow-annealed") == Guidance(2.0, "tarflow-annealed")
    with pytest.raises(ValueError, match="twice"):
        Guidance.of(g, "starflow-x")
    with pytest.raises(ValueError, match="guidance weight"):
        Guidance(-1.0)
    with pytest.raises(ValueError, match="unknown guidance rule"):
        Guidance(1.0, "cfg")
    cond = Condition(labels=torch.tensor([1, 2]))
    pair = g.pair(cond)
    assert pair.labels.tolist() == [1, 2, 1, 2] and pair.drop.tolist() == [False, False, True, True]
    x = torch.randn(2, 3, 4)
    assert torch.equal(g.feed(x), torch.cat([x, x]))
    mu, alpha = torch.randn(4, 3, 4), torch.randn(4, 3, 4)
    got = g.combine(mu, alpha)
    want = guide("tarflow", 1.5, mu[:2], alpha[:2], mu[2:], alpha[2:])
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_flow_takes_a_guidance_object_and_returns_its_statistics():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=3))).eval()
    z, y = torch.randn(2, 1, 8, 8), torch.tensor([0, 2])
    for rule in ("starflow", "tarflow", "tarflow-annealed"):
        assert torch.equal(model.inverse(z, y, guidance=2.0, guidance_rule=rule),
                           model.inverse(z, y, guidance=Guidance(2.0, rule)))
    # the annealed rule on the lean one-token decoder (2-D outputs) matches the naive sampler (3-D)
    annealed = Guidance(2.0, "tarflow-annealed")
    assert (model.inverse(z, y, guidance=annealed) - model.inverse(z, y, guidance=annealed, sampler="naive")).abs().max() < 1e-5
    x, stats = model.inverse(z, y, guidance=Guidance(1.0), sampler="jacobi", jacobi_threshold=1e-12,
                             jacobi_max_iters=2, return_stats=True)
    assert stats.plan == ["jacobi"] * 3 and stats.iterations == [[2]] * 3 and stats.sweeps() == [2, 2, 2]
    # the statistics are returned, never kept on the model (its per-call state went with the deprecated
    # ``last_jacobi_iterations``)
    assert not hasattr(model, "last_jacobi_iterations") and not hasattr(model, "_last_stats")
