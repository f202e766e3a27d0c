"""starflow's FlowAR against the official FlowAR code: what it follows, which official choices are
options, and (pinned, so a change is noticed) where it differs. The list itself is in the docstring
of starflow/peers/flowar.py; the official behaviour is restated here from its description."""
import pytest
import torch
import torch.nn.functional as F

from starflow.peers import FlowAR, FlowARConfig
from starflow.peers.flowar import block_causal_mask
from starflow.peers.rectified_flow import guided, interpolate, velocity_target
from starflow.peers.schedules import flowar_sigmas, uniform_sigmas

TINY = dict(in_channels=2, image_size=8, scales=(1, 2, 4, 8), width=16, depth=2, heads=2, head_width=16,
            head_depth=1, head_heads=2, num_classes=3, sample_steps=4)


def make(**kw) -> FlowAR:
    torch.manual_seed(0)
    model = FlowAR(FlowARConfig(**{**TINY, **kw}))
    with torch.no_grad():  # zero-initialised layers would make every comparison trivially equal
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


def draw(model, **kw):
    return model.sample(2, torch.tensor([0, 2]), generator=torch.Generator().manual_seed(1), **kw)


# ---- same -----------------------------------------------------------------------------------


def test_same_pyramid_is_area_downsampling():
    model, x = make(), torch.randn(2, 2, 8, 8)
    for s, level in zip(TINY["scales"], model.pyramid(x)):
        assert torch.allclose(level, F.interpolate(x, size=(s, s), mode="area"), atol=1e-6)


def test_same_attention_is_block_causal_over_scales():
    """Official mask: the rows of scale i see every key up to the end of scale i."""
    sizes = [s * s for s in TINY["scales"]]
    ends = torch.cumsum(torch.tensor(sizes), 0)
    official = torch.cat([torch.arange(sum(sizes))[None, :].expand(n, -1) < end for n, end in zip(sizes, ends)])
    assert torch.equal(block_causal_mask(sizes), official)


def test_same_path_target_and_guidance_convention():
    x, eps, t = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.tensor([0.0, 0.3, 1.0])
    tt = t.view(-1, 1, 1, 1)
    assert torch.allclose(interpolate(x, eps, t), (1 - tt) * x + tt * eps)
    assert torch.equal(velocity_target(x, eps), eps - x)
    v_c, v_u, lam = torch.randn(5), torch.randn(5), 2.4  # official: v_u + lambda (v_c - v_u)
    assert torch.allclose(guided(v_c, v_u, lam - 1), v_u + lam * (v_c - v_u))


def test_same_one_head_serves_every_scale_with_fresh_noise():
    model, sides = make(), []
    model.head.register_forward_hook(lambda m, args, out: sides.append(args[0].shape[-1]))
    draw(model)
    assert sorted(set(sides)) == list(TINY["scales"])
    assert FlowARConfig().cond_drop_prob == 0.1  # official label_drop_prob


# ---- options that follow the official code ----------------------------------------------------


@pytest.mark.parametrize("steps", [4, 10, 25])
def test_option_official_grid(steps):
    half = steps // 2
    official = torch.cat([torch.linspace(1, 0.3, half, dtype=torch.float64),
                          torch.linspace(0.25, 0, half + 1, dtype=torch.float64)]).float()
    assert torch.allclose(flowar_sigmas(steps), official)
    assert torch.allclose(flowar_sigmas(50), torch.linspace(1, 0, 51))


def test_option_official_guidance_ramp_and_interval():
    cfg = FlowARConfig(**TINY, guidance_ramp="flowar")
    k = len(TINY["scales"])
    assert [cfg.guidance_at(3.0, i) for i in range(k)] == [3.0 * i / (k - 1) for i in range(k)]
    # Guidance only while t <= guidance_max_t: below every grid point it never acts.
    never = make(sample_schedule="flowar", guidance_max_t=1e-6)
    assert torch.allclose(draw(never, guidance=3.0), draw(never), atol=1e-6)
    assert (draw(make(sample_schedule="flowar"), guidance=3.0) - draw(never)).abs().max() > 1e-3


def test_option_official_upsampling():
    model, x = make(upsample="bicubic-area"), torch.randn(2, 2, 4, 4)
    full = F.interpolate(x, size=(8, 8), mode="bicubic")
    assert torch.allclose(model.upsample(x, 3), F.interpolate(full, size=(8, 8), mode="area"))


# ---- differs (pinned) ---------------------------------------------------------------------------


def test_differs_defaults():
    cfg = FlowARConfig(**TINY)
    assert cfg.guidance_at(3.0, 0) > 0  # ours guides scale 1 too
    assert not torch.allclose(cfg.sigmas(10), flowar_sigmas(10))
    assert torch.equal(cfg.sigmas(10), uniform_sigmas(10))
    assert cfg.timestep_sampler == "logit-normal" and cfg.scale_loss_weights is None
    x = torch.randn(1, 2, 2, 2)
    nearest = make().upsample(x, 2)
    assert torch.equal(nearest, x.repeat_interleave(2, -1).repeat_interleave(2, -2))
    assert not torch.allclose(nearest, make(upsample="bicubic-area").upsample(x, 2))


def test_differs_head_time_is_continuous():
    """The official head rounds t to int(1000 t); ours resolves finer times."""
    model = make()
    z, sem = torch.randn(1, 2, 4, 4), torch.randn(1, 16, 16)
    a = model.head(z, torch.tensor([0.5]), sem, 2)
    b = model.head(z, torch.tensor([0.5004]), sem, 2)
    assert (a - b).abs().max() > 0


def test_differs_condition_is_a_prefix_plus_a_start_token():
    """Official: the class embedding is the scale-1 token itself. Ours: [pooled; class tokens] is a
    prefix and scale 1 starts from a learned start token."""
    model = make()
    cond = model.condition(1, torch.tensor([1]))
    prefix, _ = model.prefix(cond)
    assert prefix.shape[1] == 1 + model.config.num_class_tokens
    assert model.start_token.shape == (model.config.width,)
