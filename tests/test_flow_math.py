"""The flow's math, tested directly: invertibility, log-determinant, causality, cached decoding."""
import math

import pytest
import torch

from conftest import assert_blocks_causal, assert_logdet_matches_jacobian, perturbed, tiny_config
from starflow import STARFlow

VARIANTS = {
    "uniform-uncond": dict(deep_layers=None),
    "uniform-class-all-add": dict(deep_layers=None, num_classes=3, cond_mode="add", cond_blocks="all"),
    "deep-shallow-uncond": dict(),
    "deep-shallow-class": dict(num_classes=3),
    "deep-shallow-text": dict(cond_dim=12),
    "rms-qknorm-rgb": dict(in_channels=3, norm="rmsnorm", qk_norm=True, num_classes=3),
}


def _inputs(cfg, B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    kw = {}
    if cfg.num_classes:
        kw["y"] = torch.randint(0, cfg.num_classes, (B,), generator=g)
    if cfg.cond_dim:
        states = torch.randn(B, 5, cfg.cond_dim, generator=g)
        mask = torch.ones(B, 5, dtype=torch.bool)
        mask[0, 3:] = False
        kw["text"] = (states, mask)
    return x, kw


@pytest.mark.parametrize("name", VARIANTS)
def test_round_trip(name):
    torch.manual_seed(1)
    cfg = tiny_config(**VARIANTS[name])
    model = perturbed(STARFlow(cfg))
    x, kw = _inputs(cfg)
    z, logdet = model(x, **kw)
    assert z.shape == x.shape and logdet.shape == (x.shape[0],)
    assert not torch.allclose(z, x, atol=1e-3), "perturbed flow should not be the identity"
    x_back = model.inverse(z, **kw)
    assert (x_back - x).abs().max().item() < 1e-4


def test_fresh_model_is_identity():
    model = STARFlow(tiny_config(num_classes=3)).eval()
    x = torch.randn(2, 1, 8, 8)
    z, logdet = model(x, y=torch.tensor([0, 1]))
    assert torch.equal(z, x) and torch.equal(logdet, torch.zeros(2))


@pytest.mark.parametrize("name", ["uniform-uncond", "deep-shallow-class", "deep-shallow-text"])
def test_logdet_matches_autograd_jacobian(name):
    torch.manual_seed(2)
    cfg = tiny_config(image_size=4, **VARIANTS[name])
    model = perturbed(STARFlow(cfg).double(), scale=0.1)
    x, kw = _inputs(cfg, B=1)
    x = x.double()
    if "text" in kw:
        kw["text"] = (kw["text"][0].double(), kw["text"][1])
    assert_logdet_matches_jacobian(model, x, kw)


@pytest.mark.parametrize("name", ["uniform-uncond", "deep-shallow-class", "deep-shallow-text"])
def test_every_block_is_causal(name):
    """Perturbing token j (in the block's order) changes no predicted parameter at positions <= j."""
    torch.manual_seed(3)
    cfg = tiny_config(**VARIANTS[name])
    model = perturbed(STARFlow(cfg))
    x, kw = _inputs(cfg, B=2)
    assert_blocks_causal(model, x, kw)


def test_blocks_alternate_order():
    model = STARFlow(tiny_config())
    L = model.config.num_tokens
    assert torch.equal(model.blocks[0].order(L, "cpu"), torch.arange(L))
    assert torch.equal(model.blocks[1].order(L, "cpu"), torch.arange(L).flip(0))


@pytest.mark.parametrize("name", ["uniform-uncond", "deep-shallow-class", "deep-shallow-text", "uniform-class-all-add"])
def test_cached_and_jacobi_inverse_equal_naive(name):
    torch.manual_seed(4)
    cfg = tiny_config(**VARIANTS[name])
    # float64 so the comparison tests the decoding order, not float32 rounding.
    model = perturbed(STARFlow(cfg)).double()
    z, kw = _inputs(cfg, B=3, seed=5)
    z = z.double()
    if "text" in kw:
        kw["text"] = (kw["text"][0].double(), kw["text"][1])
    for guidance in (0.0, 1.5):
        g = dict(guidance=guidance) if cfg.conditional else {}
        ref = model.inverse(z, sampler="naive", **g, **kw)
        cached = model.inverse(z, sampler="sequential", **g, **kw)
        jacobi = model.inverse(z, sampler="jacobi", jacobi_threshold=1e-9, **g, **kw)
        windowed = model.inverse(z, sampler="jacobi", jacobi_window=5, jacobi_threshold=1e-9, **g, **kw)
        assert (cached - ref).abs().max().item() < 1e-10
        assert (jacobi - ref).abs().max().item() < 1e-6
        assert (windowed - ref).abs().max().item() < 1e-6


def test_deep_shallow_layout():
    model = STARFlow(tiny_config(num_blocks=4, layers_per_block=2, deep_layers=6, num_classes=10))
    assert [len(b.layers) for b in model.blocks] == [2, 2, 2, 6]
    assert [b.conditional for b in model.blocks] == [False, False, False, True]


def test_text_prefix_reaches_deep_block_only():
    torch.manual_seed(6)
    cfg = tiny_config(cond_dim=12)
    model = perturbed(STARFlow(cfg))
    x, kw = _inputs(cfg, B=2)
    other = (torch.randn_like(kw["text"][0]), kw["text"][1])
    h1, h2 = model.patchify(x), model.patchify(x)
    c1 = model.make_condition(2, text=kw["text"])
    c2 = model.make_condition(2, text=other)
    for block in model.blocks[:-1]:  # shallow blocks ignore the prompt entirely
        assert block.condition is None
        h1, _ = block(h1, c1 if block.conditional else None)
        h2, _ = block(h2, c2 if block.conditional else None)
        assert torch.equal(h1, h2)
    z1, _ = model.blocks[-1](h1, c1)
    z2, _ = model.blocks[-1](h2, c2)
    assert not torch.allclose(z1, z2)


def test_text_positions_make_the_prefix_an_ordered_sequence(tmp_path):
    """``text_positions``: a learned table added to the prompt's tokens, zero at init (so the same function
    until trained, and a fine-tune may add it to a model saved without it); once learned, the prefix's
    order is explicit (without it, only the causal mask within the prefix tells tokens apart)."""
    from starflow.errors import ConfigError
    from starflow.train.build import _start_from

    torch.manual_seed(8)
    plain = perturbed(STARFlow(tiny_config(cond_dim=12)))
    ordered = STARFlow(tiny_config(cond_dim=12, text_positions=True))
    plain.save_pretrained(str(tmp_path / "plain"))
    _start_from(ordered, str(tmp_path / "plain"))
    assert not ordered.blocks[-1].condition.text_pos.any()
    x, kw = _inputs(plain.config, B=2)
    states, mask = kw["text"]
    swapped = (states[:, [1, 0, *range(2, states.shape[1])]], mask)
    assert mask[:, :2].all()
    z, _ = plain(x, text=kw["text"])
    assert torch.equal(ordered(x, text=kw["text"])[0], z)  # the same function at the start of a fine-tune
    with torch.no_grad():
        ordered.blocks[-1].condition.text_pos.normal_(std=0.5)
    z_pos = ordered(x, text=kw["text"])[0]
    assert not torch.allclose(z_pos, z, atol=1e-3)
    assert not torch.allclose(ordered(x, text=swapped)[0], z_pos, atol=1e-3)
    too_long = (torch.randn(2, 40, 12), torch.ones(2, 40, dtype=torch.bool))
    with pytest.raises(ValueError, match="40 text tokens, but the model has positions for 32"):
        ordered(x, text=too_long)
    ordered.save_pretrained(str(tmp_path / "ordered"))
    with pytest.raises(ConfigError, match="text_positions True there, False here"):
        _start_from(STARFlow(tiny_config(cond_dim=12)), str(tmp_path / "ordered"))
    with pytest.raises(ConfigError, match="^text_positions: needs text conditioning"):
        tiny_config(num_classes=3, text_positions=True)


def test_condition_dropout_uses_null():
    torch.manual_seed(7)
    model = perturbed(STARFlow(tiny_config(num_classes=3)))
    x = torch.randn(2, 1, 8, 8)
    null = model.log_prob(x, cond=model.make_condition(2))
    for label in range(3):
        assert not torch.allclose(model.log_prob(x, y=torch.full((2,), label)), null)


def test_nll_and_bits_per_dim_known_answer():
    """The identity flow (a fresh model) on pixels at mid-grey: y = 2u - 1 ~ 0, so the density is the
    standard normal's at 0 and bpd = log2(2*pi)/2 + 7 to within the dequantisation width."""
    model = STARFlow(tiny_config()).eval()
    images = torch.full((3, 1, 8, 8), 128, dtype=torch.uint8)
    bpd = model.bits_per_dim(images, generator=torch.Generator().manual_seed(0))
    expected = 0.5 * math.log2(2 * math.pi) + 7
    assert bpd.shape == (3,)
    assert bpd.max().item() == pytest.approx(expected, abs=1e-4)
    # nats/dim for a zero input through the identity flow: 0.5*log(2*pi)
    assert model.nll(torch.zeros(1, 1, 8, 8)).item() == pytest.approx(0.5 * math.log(2 * math.pi), abs=1e-6)


def test_nll_of_an_input_beyond_float_range_is_inf_not_nan():
    torch.manual_seed(0)
    model = STARFlow(tiny_config()).eval()
    x = torch.randn(3, 1, 8, 8)
    x[1:] *= 1e30  # z overflows: log_prob's arithmetic gives NaN
    with torch.no_grad():
        assert model.log_prob(x)[1:].isnan().all()
        nll = model.nll(x)
    assert torch.isfinite(nll[0]) and (nll[1:] == float("inf")).all()


def test_temperature_scales_prior_noise():
    model = STARFlow(tiny_config()).eval()  # identity: samples are the prior noise itself
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = model.sample(4, generator=g())
    b = model.sample(4, temperature=0.5, generator=g())
    assert torch.allclose(b, 0.5 * a)


@pytest.mark.parametrize("extra", [dict(num_classes=3), dict(cond_dim=12, in_channels=3, input_spline_bins=6)])
def test_nll_map_splits_the_exact_nll_over_dimensions(extra):
    """nll_map says where the bits go: one entry per dimension of x, summing to -log p(x) exactly."""
    torch.manual_seed(3)
    cfg = tiny_config(**extra)
    model = perturbed(STARFlow(cfg), scale=0.1).double()
    x, kw = _inputs(cfg, B=3)
    x = x.double()
    if "text" in kw:
        kw["text"] = (kw["text"][0].double(), kw["text"][1])
    nll = model.nll_map(x, **kw)
    assert nll.shape == x.shape and nll.dtype == torch.float64
    torch.testing.assert_close(nll.flatten(1).sum(1), -model.log_prob(x, **kw), rtol=0, atol=1e-9)
    assert nll.flatten(1).std(1).min() > 0  # not one value spread evenly
