"""SD3 as its reference defines it: diffusers' SD3Transformer2DModel imported into starflow's MM-DiT,
SD3's sampling grid, diffusers' scheduler loop, the persisted position table. Tiny random models
built from configs here (no download); the whole file runs in seconds."""
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402
from diffusers.models.embeddings import get_2d_sincos_pos_embed  # noqa: E402

from starflow.cli import main  # noqa: E402
from starflow.peers import RectifiedFlow  # noqa: E402
from starflow.peers.convert import from_diffusers_sd3  # noqa: E402
from starflow.nn.embeddings import sd3_pos_embed  # noqa: E402
from starflow.peers.schedules import diffusers_sigmas, dynamic_shift_mu, sd3_sigmas, uniform_sigmas  # noqa: E402

TINY = dict(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8, num_attention_heads=2,
            joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10, out_channels=4,
            pos_embed_max_size=6)
VARIANTS = {"sd3-medium": dict(qk_norm=None), "sd3.5-large": dict(qk_norm="rms_norm"),
            "sd3.5-medium": dict(qk_norm="rms_norm", dual_attention_layers=(0, 1))}


def tiny_sd3(seed=0, **overrides) -> SD3Transformer2DModel:
    """A random diffusers SD3 transformer. Every weight is redrawn: the zero-initialised adaLN and
    output layers of a fresh model would hide a wrong mapping of exactly those layers."""
    torch.manual_seed(seed)
    ref = SD3Transformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.1)
    return ref


def text(batch, length=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, 12, generator=g), torch.randn(batch, 10, generator=g)


def starflow_velocity(model, x, sigma, states, pooled):
    return model.velocity(x, sigma, model.condition(x.shape[0], None, (states, None, pooled)))


def both_velocities(model, ref, x, sigma):
    """(diffusers' SD3 output, ours) for the same latents, random prompt states and sigmas."""
    states, pooled = text(x.shape[0])
    with torch.no_grad():
        return ref(x, states, pooled, sigma * 1000).sample, starflow_velocity(model, x, sigma, states, pooled)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_converted_sd3_matches_diffusers(variant):
    ref = tiny_sd3(**VARIANTS[variant])
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config))
    assert model.config.qk_norm == (VARIANTS[variant]["qk_norm"] == "rms_norm")
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    expected, got = both_velocities(model, ref, x, torch.tensor([1.0, 0.5, 0.01]))
    assert expected.abs().max() > 0.1  # a real signal, not two zero outputs
    assert (got - expected).abs().max() < 1e-5


def test_qk_norm_matters_so_the_switch_is_needed():
    """Loading SD3-medium (no QK-norm) into a network that applies QK-norm would be wrong."""
    ref = tiny_sd3(qk_norm=None)
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config))
    forced = RectifiedFlow(type(model.config)(**{**model.config.__dict__, "qk_norm": True}))
    own = model.state_dict()
    forced.load_state_dict({**forced.state_dict(), **own})  # q/k norms stay at their unit gain
    x = torch.randn(2, 4, 8, 8)
    states, pooled = text(2)
    with torch.no_grad():
        diff = (starflow_velocity(forced, x, torch.full((2,), 0.5), states, pooled)
                - starflow_velocity(model, x, torch.full((2,), 0.5), states, pooled)).abs().max()
    assert diff > 1e-3


def test_other_image_size_crops_the_reference_table():
    """A latent smaller than sample_size reads the centre of SD3's table, as diffusers does."""
    ref = tiny_sd3(qk_norm="rms_norm")
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config), image_size=4)
    expected, got = both_velocities(model, ref, torch.randn(2, 4, 4, 4), torch.tensor([0.6, 0.3]))
    assert (got - expected).abs().max() < 1e-5


def test_sd3_position_table_equals_the_reference():
    ref = tiny_sd3()
    for grid in (2, 4, 6):  # cropped from the 6 x 6 table whose positions are scaled to base 4
        expected = ref.pos_embed.cropped_pos_embed(2 * grid, 2 * grid)[0]
        assert torch.allclose(sd3_pos_embed(grid, 16, max_size=6, base_size=4), expected, atol=1e-6)
    # Without a max size the table is computed for the grid itself.
    expected = get_2d_sincos_pos_embed(32, 5, base_size=5)
    assert torch.allclose(sd3_pos_embed(5, 32), expected.float(), atol=1e-6)


def test_save_load_keeps_the_position_table(tmp_path):
    ref = tiny_sd3(qk_norm="rms_norm")
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config))
    model.save_pretrained(str(tmp_path))
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["net.pos_embed"], model.net.pos_embed)
    # The loaded model uses the SAVED table, not one recomputed at construction.
    saved["net.pos_embed"] = saved["net.pos_embed"] + 0.25
    save_file(saved, str(tmp_path / "model.safetensors"))
    loaded = RectifiedFlow.from_pretrained(str(tmp_path))
    assert torch.equal(loaded.net.pos_embed, model.net.pos_embed + 0.25)


def test_default_network_is_unchanged():
    """Today's models: QK-norm on, cell-centre table rebuilt at construction (not in the state dict)."""
    model = RectifiedFlow(RectifiedFlow.config_class(in_channels=1, image_size=8, width=32, depth=2, heads=2))
    keys = model.state_dict().keys()
    assert "net.pos_embed" not in keys and "net.blocks.0.image.q_norm.weight" in keys


@pytest.mark.parametrize("steps,shift", [(1, 1.0), (10, 3.0), (28, 3.0), (50, 1.0)])
def test_sd3_grid_equals_diffusers_scheduler(steps, shift):
    ours = sd3_sigmas(steps, shift)
    assert torch.allclose(ours, diffusers_sigmas(steps, shift), atol=1e-7, rtol=0)
    assert len(ours) == steps + 1 and ours[0] == 1.0 and ours[-1] == 0.0
    mu = dynamic_shift_mu(1024)
    assert torch.allclose(sd3_sigmas(steps, mu=mu), diffusers_sigmas(steps, mu=mu), atol=1e-7, rtol=0)


def test_sd3_grid_ends_with_a_small_step_unlike_the_uniform_grid():
    assert math.isclose(float(sd3_sigmas(28, 3.0)[-2]), 0.0089, abs_tol=2e-4)
    assert float(uniform_sigmas(28, 3.0)[-2]) > 0.09


@pytest.mark.parametrize("dynamic", [False, True])
def test_euler_sampling_equals_the_diffusers_scheduler_loop(dynamic):
    """starflow's sampler on the converted model == diffusers' scheduler driving diffusers'
    transformer, with CFG against an encoded 'empty prompt' of a different token length."""
    ref = tiny_sd3(qk_norm="rms_norm")
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config), shift=3.0, dynamic_shift=dynamic)
    states, pooled = text(2)
    neg_states, neg_pooled = text(1, length=3, seed=5)
    lam, steps, n = 4.0, 6, 2
    mu = dynamic_shift_mu(16) if dynamic else None

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic)
    scheduler.set_timesteps(steps, mu=mu)
    z = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        for t in scheduler.timesteps:
            tt = t.expand(n)
            v_c = ref(z, states, pooled, tt).sample
            v_u = ref(z, neg_states.expand(n, -1, -1), neg_pooled.expand(n, -1), tt).sample
            z = scheduler.step(v_u + lam * (v_c - v_u), t, z).prev_sample

    kw = dict(text=(states, None, pooled), guidance=lam - 1, steps=steps, negative=(neg_states, None, neg_pooled))
    ours = model.sample(n, generator=torch.Generator().manual_seed(11), **kw)
    assert z.abs().max() > 0.1
    assert (ours - z).abs().max() < 1e-5
    handed_over = model.sample(n, generator=torch.Generator().manual_seed(11), sampler="diffusers", **kw)
    assert (handed_over - z).abs().max() < 1e-5


def test_converted_model_needs_a_negative_for_guidance():
    ref = tiny_sd3()
    model = from_diffusers_sd3(ref.state_dict(), dict(ref.config))
    states, pooled = text(1)
    with pytest.raises(ValueError, match="negative"):
        model.sample(1, text=(states, None, pooled), guidance=1.0, steps=2)


def test_conversion_refuses_what_it_cannot_place():
    ref = tiny_sd3()
    state = {**ref.state_dict(), "transformer_blocks.0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="no place"):
        from_diffusers_sd3(state, dict(ref.config))
    with pytest.raises(ValueError, match="qk_norm"):
        from_diffusers_sd3(ref.state_dict(), {**ref.config, "qk_norm": "layer_norm"})


def test_cli_converts_a_pipeline_folder(tmp_path, capsys):
    ref = tiny_sd3(qk_norm="rms_norm", dual_attention_layers=(0,))
    ref.save_pretrained(str(tmp_path / "transformer"))
    FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(str(tmp_path / "scheduler"))
    assert main(["convert-sd3", str(tmp_path / "transformer"), "--out", str(tmp_path / "out")]) == 0
    assert "converted" in capsys.readouterr().out
    model = RectifiedFlow.from_pretrained(str(tmp_path / "out"))
    assert model.config.shift == 2.5 and model.config.dual_attention_layers == (0,)
    expected, got = both_velocities(model, ref, torch.randn(2, 4, 8, 8), torch.tensor([0.9, 0.1]))
    assert (got - expected).abs().max() < 1e-5
