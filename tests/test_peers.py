"""Peer systems: SD3 rectified flow (MM-DiT) and FlowAR. Tiny models only; the whole file runs in seconds."""
import math

import pytest
import torch

from starflow.peers import FlowAR, FlowARConfig, RectifiedFlow, RectifiedFlowConfig
from starflow.peers.flowar import block_causal_mask
from starflow.peers.rectified_flow import (MODE_SCALE_MAX, TimestepSampler, euler_sample, interpolate, mode_map,
                                           shift_timesteps, velocity_target)

TINY_RF = dict(in_channels=4, image_size=8, patch_size=2, width=32, depth=2, heads=2, sample_steps=4)
TINY_AR = dict(in_channels=4, image_size=8, width=32, depth=2, heads=2, head_width=32, head_depth=1, head_heads=2,
               sample_steps=3)



def randomize_zero_params(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> None:
    """adaLN-Zero makes an untrained model output exactly 0 whatever its input; tests of information
    flow need a model that actually reads its inputs, so fill the zero-initialised tensors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)


# ----------------------------------------------------------------------------------------------
# Rectified flow: path, target, exact-velocity toy
# ----------------------------------------------------------------------------------------------


def gaussian_velocity(z, t, m, s):
    """Exact E[eps - x0 | z_t = z] for x0 ~ N(m, s^2), eps ~ N(0, 1), z_t = (1-t) x0 + t eps."""
    var = (1 - t) ** 2 * s ** 2 + t ** 2
    return (t - (1 - t) * s ** 2) / var * (z - (1 - t) * m) - m


def test_path_endpoints_and_target_is_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    assert torch.equal(interpolate(x0, eps, torch.zeros(5)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, eps, torch.ones(5)), eps)  # t = 1 is noise
    t, h = torch.full((5,), 0.37, dtype=torch.float64), 1e-6
    x0, eps = x0.double(), eps.double()
    fd = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t - h)) / (2 * h)
    assert torch.allclose(fd, velocity_target(x0, eps), atol=1e-8)
    assert torch.equal(velocity_target(x0, eps), eps - x0)


def test_regressing_the_target_recovers_the_exact_gaussian_velocity():
    """Least squares of (eps - x0) on z_t (what the MSE loss does) gives the analytic velocity field
    that the sampler test below integrates: loss target and sampler agree."""
    m, s, n = 2.0, 0.5, 400_000
    g = torch.Generator().manual_seed(1)
    for t in (0.2, 0.5, 0.9):
        x0 = m + s * torch.randn(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, generator=g, dtype=torch.float64)
        z = interpolate(x0, eps, torch.full((n,), t, dtype=torch.float64))
        design = torch.stack([z, torch.ones_like(z)], dim=1)
        coef = torch.linalg.lstsq(design, velocity_target(x0, eps)[:, None]).solution.squeeze()
        grid = torch.tensor([-1.0, 0.5, 2.0], dtype=torch.float64)
        fitted = coef[0] * grid + coef[1]
        assert torch.allclose(fitted, gaussian_velocity(grid, t, m, s), atol=0.02), (t, fitted)


def test_euler_with_exact_velocity_lands_on_the_data_gaussian():
    m, s = 2.0, 0.5
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(20_000, generator=g)
    z0 = euler_sample(lambda z, t: gaussian_velocity(z, t, m, s), z1, steps=400)
    # For Gaussian data the ODE map is affine and monotone, hence exactly z0 = m + s z1.
    assert torch.allclose(z0, m + s * z1, atol=0.02)
    assert abs(z0.mean().item() - m) < 0.03 and abs(z0.std().item() - s) < 0.02
    # The shifted grid integrates the same ODE, so it lands on the same map.
    z0_shift = euler_sample(lambda z, t: gaussian_velocity(z, t, m, s), z1, steps=400, shift=3.0)
    assert torch.allclose(z0_shift, m + s * z1, atol=0.03)


def test_model_loss_target_is_eps_minus_x0():
    model = RectifiedFlow(RectifiedFlowConfig(**TINY_RF)).eval()
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])

    class Zero(torch.nn.Module):
        def forward(self, z, t, cond):
            return torch.zeros_like(z)

    class Oracle(torch.nn.Module):  # knows x0, so (z_t - x0) / t = eps - x0 exactly
        def forward(self, z, t, cond):
            return (z - x0) / t[:, None, None, None]

    model.net = Zero()
    assert torch.allclose(model.loss(x0, noise=eps, t=t), ((eps - x0) ** 2).mean())
    model.net = Oracle()
    assert model.loss(x0, noise=eps, t=t).item() < 1e-10


# ----------------------------------------------------------------------------------------------
# Timesteps: shift and samplers
# ----------------------------------------------------------------------------------------------


def test_shift_formula():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert torch.allclose(shift_timesteps(t, 1.0), t)
    for alpha in (0.5, 3.0):
        ts = shift_timesteps(t, alpha)
        assert ts[0] == 0 and ts[-1] == 1
        assert (ts[1:] > ts[:-1]).all()
        assert torch.allclose(shift_timesteps(ts, 1 / alpha), t)  # the inverse shift undoes it
    assert math.isclose(shift_timesteps(torch.tensor(0.5), 3.0).item(), 0.75)
    assert (shift_timesteps(t, 3.0)[1:-1] > t[1:-1]).all()  # alpha > 1 pushes towards noise
    with pytest.raises(ValueError, match="alpha"):
        shift_timesteps(t, 0.0)


@pytest.mark.parametrize("s", [-1.01, -3.0, MODE_SCALE_MAX + 0.01, 2.0])
def test_mode_sampler_rejects_non_monotone_scale(s):
    with pytest.raises(ValueError, match="mode_scale"):
        TimestepSampler("mode", mode_scale=s)
    with pytest.raises(ValueError, match="mode_scale"):
        RectifiedFlowConfig(timestep_sampler="mode", mode_scale=s)
    u = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert not (mode_map(u, s)[1:] <= mode_map(u, s)[:-1]).all()  # why it is rejected: the map folds


@pytest.mark.parametrize("s", [-1.0, 0.0, 1.29, MODE_SCALE_MAX])
def test_mode_sampler_accepts_monotone_range(s):
    u = torch.linspace(0, 1, 2001, dtype=torch.float64)
    assert (mode_map(u, s)[1:] <= mode_map(u, s)[:-1] + 1e-12).all()
    t = TimestepSampler("mode", mode_scale=s)(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 1


def test_timestep_samplers_range_and_bad_parameters():
    g = torch.Generator().manual_seed(0)
    for kind in ("logit-normal", "mode", "cosmap", "uniform"):
        t = TimestepSampler(kind)(20_000, generator=g)
        assert t.shape == (20_000,) and t.min() >= 0 and t.max() <= 1
    t = TimestepSampler("logit-normal", logit_mean=1.0, logit_std=0.5)(20_000, generator=g)
    assert abs(t.median().item() - torch.sigmoid(torch.tensor(1.0)).item()) < 0.01
    with pytest.raises(ValueError, match="logit_std"):
        TimestepSampler("logit-normal", logit_std=0.0)
    with pytest.raises(ValueError, match="unknown timestep sampler"):
        TimestepSampler("bogus")


# ----------------------------------------------------------------------------------------------
# MM-DiT
# ----------------------------------------------------------------------------------------------


def test_mmdit_streams_have_separate_weights():
    model = RectifiedFlow(RectifiedFlowConfig(**TINY_RF, cond_dim=8))
    all_named = list(model.named_parameters(remove_duplicate=False))
    assert len({id(p) for _, p in all_named}) == len(all_named)  # nothing shared anywhere
    for block in model.net.blocks:
        img = {id(p) for p in block.image.parameters()}
        ctx = {id(p) for p in block.context.parameters()}
        assert img and ctx and not img & ctx
        for part in ("modulation", "qkv", "q_norm", "k_norm"):
            assert getattr(block.image, part) is not getattr(block.context, part)


def test_mmdit_joint_attention_reads_text_tokens_and_respects_the_mask():
    torch.manual_seed(0)
    model = RectifiedFlow(RectifiedFlowConfig(**TINY_RF, cond_dim=8, pooled_dim=6)).eval()
    randomize_zero_params(model)
    g = torch.Generator().manual_seed(4)
    z, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([0.3, 0.8])
    states, pooled = torch.randn(2, 5, 8, generator=g), torch.randn(2, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)

    def out(st):  # pooled held fixed: attention is the only way a token can reach the image
        return model.velocity(z, t, model.condition(2, text=(st, mask, pooled)))

    base = out(states)
    real = states.clone()
    real[0, 1] += 1.0
    changed = out(real)
    assert (changed[0] - base[0]).abs().max() > 1e-4  # image of row 0 reads text token 1
    assert torch.allclose(changed[1], base[1])  # rows do not mix
    padded = states.clone()
    padded[0, 4] += 100.0
    assert torch.allclose(out(padded), base, atol=1e-6)  # padding is invisible


# ----------------------------------------------------------------------------------------------
# FlowAR
# ----------------------------------------------------------------------------------------------


def test_block_causal_mask_small_case():
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ], dtype=torch.bool)
    assert torch.equal(block_causal_mask([2, 1, 4]), expected)


def test_flowar_attention_mask_is_exactly_block_causal_with_padding():
    model = FlowAR(FlowARConfig(**{**TINY_AR, "image_size": 4, "scales": (1, 2, 4)}, cond_dim=8))
    text_mask = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    cond = model.condition(2, text=(torch.randn(2, 3, 8), text_mask, None))
    _, prefix_mask = model.prefix(cond)
    mask = model.attention_mask(prefix_mask)
    lp = prefix_mask.shape[1]  # pooled token + 3 text slots
    block = [0] * lp + [1] * 1 + [2] * 4 + [3] * 16
    total = len(block)
    assert mask.shape == (2, 1, total, total)
    for b in range(2):
        key_ok = [True] + text_mask[b].tolist() + [True] * (total - lp)
        expected = torch.tensor([[block[k] <= block[q] and key_ok[k] for k in range(total)] for q in range(total)])
        assert torch.equal(mask[b, 0], expected)


def test_flowar_later_scale_inputs_do_not_reach_earlier_semantics():
    model = FlowAR(FlowARConfig(**TINY_AR, num_classes=3)).eval()
    g = torch.Generator().manual_seed(5)
    cond = model.condition(2, torch.tensor([0, 2]))
    ups = [None] + [torch.randn(2, 4, s, s, generator=g) for s in (2, 4, 8)]
    base = model.semantics(cond, ups)
    perturbed = list(ups)
    perturbed[2] = ups[2] + 1.0  # the AR input of scale index 2 (side 4)
    out = model.semantics(cond, perturbed)
    for i in (0, 1):
        assert torch.allclose(out[i], base[i], atol=1e-6)
    for i in (2, 3):
        assert (out[i] - base[i]).abs().max() > 1e-4


def test_flowar_per_scale_shapes():
    model = FlowAR(FlowARConfig(**TINY_AR, num_classes=3))
    x = torch.randn(3, 4, 8, 8)
    pyr = model.pyramid(x)
    assert [tuple(p.shape) for p in pyr] == [(3, 4, s, s) for s in (1, 2, 4, 8)]
    assert torch.allclose(pyr[0][..., 0, 0], x.mean(dim=(2, 3)), atol=1e-6)
    assert torch.equal(pyr[-1], x)
    assert torch.allclose(model.pyramid(model.upsample(pyr[1], 3))[1], pyr[1], atol=1e-6)  # up is pool's right-inverse
    ups = [None] + [model.upsample(pyr[i - 1], i) for i in range(1, 4)]
    sems = model.semantics(model.condition(3, torch.tensor([0, 1, 2])), ups)
    assert [tuple(s.shape) for s in sems] == [(3, s * s, 32) for s in (1, 2, 4, 8)]
    for i, (p, sem) in enumerate(zip(pyr, sems)):
        assert model.head(p, torch.rand(3), sem, i).shape == p.shape
    total, per_scale = model.loss(x, torch.tensor([0, 1, 2]), return_per_scale=True)
    assert total.ndim == 0 and per_scale.shape == (4,)
    assert torch.allclose(total, per_scale.mean())  # default: equal scale weights


def test_flowar_config_rejects_bad_scales():
    with pytest.raises(ValueError, match="last scale"):
        FlowARConfig(image_size=8, scales=(1, 2, 4))
    with pytest.raises(ValueError, match="divide"):
        FlowARConfig(image_size=12, scales=(1, 5, 12))
    with pytest.raises(ValueError, match="increasing"):
        FlowARConfig(image_size=8, scales=(2, 1, 8))
    with pytest.raises(ValueError, match="scale_loss_weights"):
        FlowARConfig(scale_loss_weights=(1.0, 1.0))


def test_flowar_kv_cached_pass_equals_uncached():
    model = FlowAR(FlowARConfig(**TINY_AR, cond_dim=8, pooled_dim=5)).eval()
    g = torch.Generator().manual_seed(6)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    cond = model.condition(2, text=(torch.randn(2, 4, 8, generator=g), text_mask, torch.randn(2, 5, generator=g)))
    ups = [None] + [torch.randn(2, 4, s, s, generator=g) for s in (2, 4, 8)]
    full = model.semantics(cond, ups)
    cached = model.semantics_cached(cond, ups)
    for a, b in zip(full, cached):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Both models: interface
# ----------------------------------------------------------------------------------------------


def make(kind: str, **kw):
    if kind == "rf":
        return RectifiedFlow(RectifiedFlowConfig(**TINY_RF, **kw))
    return FlowAR(FlowARConfig(**TINY_AR, **kw))


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_cfg_with_zero_weight_equals_unguided_sampler(kind):
    model = make(kind, num_classes=3).eval()
    randomize_zero_params(model)
    y = torch.tensor([0, 1, 2])
    plain = model.sample(3, y, guidance=0.0, generator=torch.Generator().manual_seed(7))
    batched = model._sample(3, y, None, 0.0, None, torch.Generator().manual_seed(7), None, cfg_batch=True)
    assert torch.allclose(plain, batched, atol=1e-5)
    guided = model.sample(3, y, guidance=2.0, generator=torch.Generator().manual_seed(7))
    assert (guided - plain).abs().max() > 1e-4  # and guidance does something


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_save_load_round_trip(kind, tmp_path):
    model = make(kind, num_classes=3, cond_drop_prob=0.2).eval()
    randomize_zero_params(model)
    model.save_pretrained(str(tmp_path))
    loaded = type(model).from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb and torch.equal(a, b)
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([1, 2])
    la = model.loss(x, y, generator=torch.Generator().manual_seed(0))
    lb = loaded.loss(x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(la, lb)
    other = RectifiedFlow if kind == "ar" else FlowAR
    with pytest.raises(ValueError, match="not"):
        other.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_tiny_model_loss_decreases(kind):
    torch.manual_seed(0)
    model = make(kind, num_classes=2)
    # Toy batch: two classes of smooth, distinct patterns.
    grid = torch.linspace(-1, 1, 8)
    pattern = torch.stack([grid[None, :].expand(8, 8), grid[:, None].expand(8, 8)])  # [2, 8, 8]
    y = torch.tensor([0, 1] * 8)
    x = pattern[y][:, None].expand(16, 4, 8, 8) * torch.linspace(0.5, 1.5, 4)[None, :, None, None]

    def eval_loss():
        model.eval()
        with torch.no_grad():
            value = model.loss(x, y, generator=torch.Generator().manual_seed(123)).item()
        model.train()
        return value

    before = eval_loss()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(30):
        loss = model.loss(x, y, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = eval_loss()
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_interface_shapes_autocast_and_errors(kind):
    model = make(kind, cond_dim=8)
    randomize_zero_params(model)
    text = (torch.randn(2, 3, 8), torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool), None)
    x = torch.randn(2, 4, 8, 8)
    assert model.num_params() == sum(p.numel() for p in model.parameters()) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model.loss(x, text=text)
        out = model.sample(2, text=text, guidance=1.5, steps=2, generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and out.shape == (2, 4, 8, 8) and torch.isfinite(out).all()
    assert model.sample(2, steps=2).shape == (2, 4, 8, 8)  # no condition = the learned null
    with pytest.raises(NotImplementedError, match="no exact likelihood"):
        model.nll(x)
    with pytest.raises(ValueError, match="num_classes=0"):
        model.loss(x, y=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="x must be"):
        model.loss(torch.randn(2, 4, 6, 6), text=text)
    with pytest.raises(ValueError, match="text states"):
        model.loss(x, text=(torch.randn(2, 3, 5), None, None))
    uncond = make(kind)
    with pytest.raises(ValueError, match="guidance needs a conditional model"):
        uncond.sample(2, guidance=1.0, steps=1)
    with pytest.raises(ValueError, match=r"class labels must lie"):
        make(kind, num_classes=3).loss(x, y=torch.tensor([0, 3]))


@pytest.mark.parametrize("kind", ["rf", "ar"])
def test_condition_dropout_comes_from_the_trainer_not_the_loss(kind, tmp_path):
    """The trainer draws the peers' dropout mask for the global batch and hands it on the Condition; a
    peer's loss draws none of its own (training mode and eval mode give the same loss for a seed)."""
    from starflow.data import DigitsDataset
    from starflow.flow.condition import Condition
    from starflow.train.config import TrainConfig
    from starflow.train.trainer import Trainer

    cfg = {**(TINY_RF if kind == "rf" else TINY_AR), "in_channels": 1, "num_classes": 10, "cond_drop_prob": 0.5}
    model = RectifiedFlow(RectifiedFlowConfig(**cfg)) if kind == "rf" else FlowAR(FlowARConfig(**cfg))
    randomize_zero_params(model)
    x, y = torch.randn(6, 1, 8, 8), torch.arange(6)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.train().loss(x, y, generator=g()), model.eval().loss(x, y, generator=g()))
    dropped = Condition(labels=y).with_drop(torch.tensor([True, False] * 3))
    assert not torch.equal(model.loss(x, cond=dropped, generator=g()), model.loss(x, y, generator=g()))
    trainer = Trainer(model, DigitsDataset("digits", "train"),
                      TrainConfig(dataset="digits", out_dir=str(tmp_path), steps=1, batch_size=64, device="cpu"))
    torch.manual_seed(0)
    (_, labels, drop), = trainer.get_batch(0)
    assert drop is not None and drop.shape == (64,) and 0 < int(drop.sum()) < 64  # p = 0.5 over 64 rows
    cond = trainer.loss_condition(labels, drop)["cond"]
    assert torch.equal(cond.labels, labels) and torch.equal(cond.drop, drop)
