"""The released STARFlow model's architecture switches keep the flow exact: round trip, log-det = autograd
Jacobian, causality, cached = naive decoding (and both Jacobi samplers), and they train, save and load."""
import json
import os

import pytest
import torch

from conftest import assert_blocks_causal, assert_logdet_matches_jacobian, perturbed, tiny_config
from test_flow_math import _inputs
from starflow import STARFlow, TrainConfig
from starflow.data import DigitsDataset
from starflow.train.trainer import Trainer

OFFICIAL = dict(positions="rope", start_token=True, scale="softplus", soft_clip=3.0, final_norm=True, seq_order="L2R")
SWITCHES = {
    "rope-2d": dict(positions="rope"),
    "rope-3d-text": dict(positions="rope", cond_dim=12, width=64, head_dim=32),
    "start-token": dict(start_token=True),
    "start-token-class": dict(start_token=True, num_classes=3),
    "softplus-clip": dict(scale="softplus", soft_clip=2.0),
    "final-norm": dict(final_norm=True),
    "l2r-order": dict(seq_order="L2R"),
    "gqa": dict(num_kv_heads=1, num_classes=3),
    "swiglu": dict(mlp="swiglu"),
    "wide-deep-block": dict(deep_width=48, num_classes=3),
    "official-text": dict(OFFICIAL, cond_dim=12, width=64, head_dim=32, learned_null=False, cond_drop_prob=0.0,
                          text_padding="attend", max_text_tokens=6),
    "official-class-learned-null": dict(OFFICIAL, num_classes=3, num_kv_heads=1, mlp="swiglu", deep_width=48),
    "input-spline": dict(input_spline_bins=6, input_spline_bound=2.0, num_classes=3),
}


def _model(name, dtype=torch.float32, scale=0.05, **extra):
    torch.manual_seed(11)
    cfg = tiny_config(**{**SWITCHES[name], **extra})
    return perturbed(STARFlow(cfg), scale=scale).to(dtype), cfg


def _cast(kw, dtype):
    if "text" in kw:
        kw["text"] = (kw["text"][0].to(dtype), kw["text"][1])
    return kw


def _guidance_kwargs(model, kw, B):
    """A guidance negative: the learned null, or (no learned null) other text states."""
    if not model.config.conditional:
        return {}
    g = dict(guidance=1.5)
    if not model.config.learned_null:
        g["negative_text"] = (torch.randn_like(kw["text"][0]), kw["text"][1])
    return g


@pytest.mark.parametrize("name", SWITCHES)
def test_round_trip(name):
    model, cfg = _model(name)
    x, kw = _inputs(cfg)
    z, logdet = model(x, **kw)
    assert not torch.allclose(z, x, atol=1e-3)
    assert (model.inverse(z, **kw) - x).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", SWITCHES)
def test_fresh_model_is_identity(name):
    cfg = tiny_config(**SWITCHES[name])
    model = STARFlow(cfg).eval()
    x, kw = _inputs(cfg, B=2)
    z, logdet = model(x, **kw)
    torch.testing.assert_close(z, x, atol=1e-6, rtol=0)
    assert logdet.abs().max().item() < 1e-5


@pytest.mark.parametrize("name", SWITCHES)
def test_logdet_matches_autograd_jacobian(name):
    model, cfg = _model(name, torch.float64, scale=0.1, image_size=4)
    x, kw = _inputs(cfg, B=1)
    x, kw = x.double(), _cast(kw, torch.float64)
    assert_logdet_matches_jacobian(model, x, kw)


@pytest.mark.parametrize("name", SWITCHES)
def test_every_block_is_causal(name):
    model, cfg = _model(name)
    x, kw = _inputs(cfg, B=2)
    assert_blocks_causal(model, x, kw)


@pytest.mark.parametrize("name", SWITCHES)
def test_cached_and_jacobi_inverse_equal_naive(name):
    model, cfg = _model(name, torch.float64)
    z, kw = _inputs(cfg, B=3, seed=5)
    z, kw = z.double(), _cast(kw, torch.float64)
    for g in ({}, _guidance_kwargs(model, kw, 3)):
        ref = model.inverse(z, sampler="naive", **g, **kw)
        cached = model.inverse(z, sampler="sequential", **g, **kw)
        jacobi = model.inverse(z, sampler="jacobi", jacobi_window=5, jacobi_threshold=1e-9, **g, **kw)
        chunked = model.inverse(z, sampler="chunked-jacobi", jacobi_window=5, jacobi_threshold=1e-20,
                                jacobi_max_iters=6, **g, **kw)
        assert (cached - ref).abs().max().item() < 1e-10
        assert (jacobi - ref).abs().max().item() < 1e-6
        assert (chunked - ref).abs().max().item() < 1e-10  # K + 1 sweeps: exact, cache included


def test_rope_sees_position_and_start_token_predicts_token_zero():
    model, cfg = _model("official-class-learned-null")
    x, kw = _inputs(cfg, B=2)
    block = model.blocks[0]
    ctx = block.context(None, 2, x.device)
    out = block.predict(model.patchify(x)[:, ctx.perm], ctx)
    assert out[:, 0].abs().max() > 0  # the start token gives token 0 a prediction
    same = torch.zeros(2, cfg.num_tokens, cfg.token_dim)  # equal tokens: only positions tell slots apart
    out = block.predict(same, ctx)
    assert not torch.allclose(out[:, 2], out[:, 3])


def test_l2r_flips_block_order():
    r2l, l2r = STARFlow(tiny_config()), STARFlow(tiny_config(seq_order="L2R"))
    assert [b.reverse_order for b in r2l.blocks] == [False, True, False]
    assert [b.reverse_order for b in l2r.blocks] == [True, False, True]


def test_switch_config_errors():
    from starflow.errors import ConfigError

    for bad, field in [(dict(positions="sinusoid"), "positions"), (dict(scale="sigmoid"), "scale"),
                       (dict(num_kv_heads=3), "num_kv_heads"), (dict(deep_width=40), "deep_width"),
                       (dict(positions="rope", cond_dim=4, head_dim=8), "head_dim"), (dict(mlp="relu"), "mlp"),
                       (dict(seq_order="T2B"), "seq_order"), (dict(soft_clip=-1.0), "soft_clip"),
                       (dict(input_spline_bins=1), "input_spline_bins"), (dict(input_spline_bound=0.0), "input_spline_bound")]:
        with pytest.raises(ConfigError, match=field):
            tiny_config(**bad)
    with pytest.raises(ConfigError, match="learned_null"):
        tiny_config(num_classes=3, learned_null=False)  # condition dropout on by default


def test_trained_with_switches_saves_loads_and_samples(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config(**{**SWITCHES["official-class-learned-null"], "num_classes": 10})
    model = STARFlow(cfg)
    train = TrainConfig(dataset="digits", out_dir=str(tmp_path), steps=20, batch_size=16, log_every=1,
                        ckpt_every=20, sample_every=100, warmup_steps=2, lr=3e-3)
    out = Trainer(model, DigitsDataset("digits", "train"), train).train()
    with open(os.path.join(tmp_path, "log.jsonl")) as f:
        losses = [r["loss"] for r in map(json.loads, f) if "loss" in r]
    assert sum(losses[-4:]) < sum(losses[:4])
    loaded = STARFlow.from_pretrained(os.path.join(out, "model"))
    assert loaded.config == cfg
    a = loaded.sample(3, y=[1, 2, 3], guidance=1.0, generator=torch.Generator().manual_seed(0))
    b = loaded.sample(3, y=[1, 2, 3], guidance=1.0, generator=torch.Generator().manual_seed(0),
                      sampler="chunked-jacobi", jacobi_window=4, jacobi_threshold=1e-12, jacobi_max_iters=5)
    assert a.shape == (3, 1, 8, 8) and torch.isfinite(a).all()
    assert (a - b).abs().max().item() < 1e-4
