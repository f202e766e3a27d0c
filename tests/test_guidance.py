"""Both guidance rules against hand-computed cases and the tilted density they claim to sample."""
import math

import pytest
import torch

from conftest import perturbed, tiny_config
from starflow import STARFlow
from starflow.flow.guidance import guide

T = lambda *v: torch.tensor(v, dtype=torch.float64).view(1, -1, 1)  # noqa: E731


def test_starflow_rule_hand_computed():
    # sigma_c = 1, sigma_u = 2 -> s = 1/4; w = 2 -> denom = 1 + 2 - 0.5 = 2.5
    mu, alpha = guide("starflow", 2.0, T(1.0), T(0.0), T(3.0), T(math.log(2.0)))
    assert mu.item() == pytest.approx((3 * 1.0 - 2 * 0.25 * 3.0) / 2.5)
    assert math.exp(alpha.item()) == pytest.approx(1 / math.sqrt(2.5))


def test_starflow_rule_clips_when_conditional_is_wider():
    # sigma_c = 2 > sigma_u = 1 -> s clipped to 1, denom = 1: sample from p_c unchanged in scale,
    # mean (1+w) mu_c - w mu_u.
    mu, alpha = guide("starflow", 3.0, T(1.0), T(math.log(2.0)), T(0.5), T(0.0))
    assert mu.item() == pytest.approx(4 * 1.0 - 3 * 0.5)
    assert math.exp(alpha.item()) == pytest.approx(2.0)


def test_w_zero_returns_conditional():
    for rule in ("starflow", "tarflow", "tarflow-annealed"):
        mu, alpha = guide(rule, 0.0, T(1.0, 2.0), T(0.1, 0.2), T(5.0, 6.0), T(-1.0, 1.0), torch.arange(2), 2)
        assert torch.equal(mu, T(1.0, 2.0)) and torch.equal(alpha, T(0.1, 0.2))


def test_tarflow_rules_hand_computed():
    mu, alpha = guide("tarflow", 2.0, T(1.0), T(0.5), T(0.0), T(0.0))
    assert mu.item() == 3.0 and alpha.item() == 1.5
    mu, alpha = guide("tarflow-annealed", 2.0, T(1.0, 1.0, 1.0), T(0.5, 0.5, 0.5), T(0.0, 0.0, 0.0),
                      T(0.0, 0.0, 0.0), torch.arange(3), 3)
    assert mu.flatten().tolist() == [1.0, 2.0, 3.0]  # w ramps 0 -> 1 -> 2 over positions


@pytest.mark.parametrize("case", [(0.3, 0.8, -1.0, 1.5, 1.5), (0.0, 1.2, 2.0, 0.7, 4.0), (1.0, 0.5, 1.0, 0.5, 0.7)])
def test_starflow_rule_equals_tilted_density_on_a_grid(case):
    mu_c, s_c, mu_u, s_u, w = case
    grid = torch.linspace(-15, 15, 200001, dtype=torch.float64)
    logp = lambda m, s: -0.5 * ((grid - m) / s) ** 2 - math.log(s)  # noqa: E731
    s = min(s_c / s_u, 1.0) ** 2
    # The rule's target: p_c^(1+w)/p_u^w, with the clip making it p_c^(1+w) / q^w where q has sigma_c if sigma_c > sigma_u.
    log_tilt = (1 + w) * logp(mu_c, s_c) - w * logp(mu_u, s_u if s_c <= s_u else s_c)
    p = torch.exp(log_tilt - log_tilt.max())
    p = p / p.sum()
    mean = (p * grid).sum().item()
    std = math.sqrt((p * (grid - mean) ** 2).sum().item())
    mu, alpha = guide("starflow", w, T(mu_c), T(math.log(s_c)), T(mu_u), T(math.log(s_u)))
    assert mu.item() == pytest.approx(mean, abs=1e-6)
    assert math.exp(alpha.item()) == pytest.approx(std, abs=1e-6)
    assert s == pytest.approx(min(s_c / s_u, 1.0) ** 2)


def test_guided_sampling_with_w_zero_is_bit_equal_to_unguided():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=3)))
    y = torch.tensor([0, 1, 2])
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = model.sample(3, y=y, generator=g())
    for rule in ("starflow", "tarflow", "tarflow-annealed"):
        assert torch.equal(model.sample(3, y=y, generator=g(), guidance=0.0, guidance_rule=rule), plain)


def test_guidance_changes_only_the_conditional_block():
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=3)))
    y = torch.tensor([0, 1])
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    plain = model.sample(2, y=y, generator=g())
    guided = model.sample(2, y=y, generator=g(), guidance=2.0)
    assert not torch.allclose(plain, guided)
