"""Fast sampling paths: the lean one-token decoder, the plain-causal attention path, and the per-block
plan samplers (selective, segment, auto) with their stored calibration."""
import pytest
import torch

import starflow.nn.attention as T
from conftest import perturbed, tiny_config
from starflow import STARFlow
from starflow.flow.sampling import SAMPLERS
from starflow.flow.selective_jacobi import (CALIBRATION_NAME, SEQUENTIAL, calibrate, default_selective,
                                            load_calibration, merge_calibrations, resolve_plan)
from test_flow_math import VARIANTS, _inputs


def _double_model(name, seed=4):
    torch.manual_seed(seed)
    cfg = tiny_config(**VARIANTS[name])
    model = perturbed(STARFlow(cfg)).double()
    z, kw = _inputs(cfg, B=3, seed=5)
    if "text" in kw:
        kw["text"] = (kw["text"][0].double(), kw["text"][1])
    return model, z.double(), kw


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_sampler_equals_naive_float64(name):
    model, z, kw = _double_model(name)
    T_ = len(model.blocks)
    plans = {"selective": dict(sampler="selective"),
             "segments": dict(plan=["jacobi:3"] * T_),
             "mixed": dict(plan=(["jacobi", "jacobi:5", SEQUENTIAL] * T_)[:T_])}
    for guidance in ((0.0, 1.5) if model.config.conditional else (0.0,)):
        g = dict(guidance=guidance) if model.config.conditional else {}
        ref = model.inverse(z, sampler="naive", **g, **kw)
        assert (model.inverse(z, **g, **kw) - ref).abs().max().item() < 1e-10
        for how in plans.values():
            # A threshold below float64 noise: Jacobi runs to its cap (the window), which is exact.
            x = model.inverse(z, jacobi_threshold=1e-300, **how, **g, **kw)
            assert (x - ref).abs().max().item() < 1e-10, how


def test_sampler_names_are_one_list():
    from starflow.cli import sample as cli_sample
    import argparse

    p = argparse.ArgumentParser()
    cli_sample.add_sampling_args(p)
    action = next(a for a in p._actions if a.dest == "sampler")
    assert tuple(action.choices) == (*SAMPLERS, "diffusers")  # + the rectified-flow peers' diffusers loop
    for name in ("selective", "segment", "auto"):
        assert name in SAMPLERS


def test_plan_samplers_honour_threshold_and_cap():
    model, z, kw = _double_model("deep-shallow-class")
    L, T_ = model.config.num_tokens, len(model.blocks)
    # A huge threshold stops every window after its first sweep.
    _, stats = model.inverse(z, plan=["jacobi:4"] * T_, jacobi_threshold=1e9, return_stats=True, **kw)
    assert stats.iterations == [[1] * (L // 4)] * T_
    # A cap below the window length is honoured; a sequential block records no sweeps.
    _, stats = model.inverse(z, plan=["jacobi"] * (T_ - 1) + [SEQUENTIAL], jacobi_threshold=1e-300,
                             jacobi_max_iters=2, return_stats=True, **kw)
    assert stats.iterations == [[2]] * (T_ - 1) + [[]]
    assert stats.plan == default_selective(T_)
    # Without a cap the whole-block window runs at most L sweeps, and stops once the change is below it.
    _, stats = model.inverse(z, plan=["jacobi"] * T_, jacobi_threshold=1e-300, return_stats=True, **kw)
    assert all(1 <= it[0] <= L for it in stats.iterations)
    # sweeps() lists them in sampling order: the last block first.
    assert stats.sweeps() == [i for b in reversed(range(T_)) for i in stats.iterations[b]]


def test_plain_causal_attention_equals_masked_path(monkeypatch):
    """Training's is_causal=True path gives the outputs and gradients of the explicit causal mask."""
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(deep_layers=None))).train()
    x = torch.randn(4, 1, 8, 8)
    assert T.attention_mask(0, 16, None, "cpu") is T.CAUSAL
    fast = model.loss(x)
    fast.backward()
    g_fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def explicit(q_start, q_len, key_valid, device):
        k = torch.arange(q_start + q_len, device=device)
        return (k[None, :] <= torch.arange(q_start, q_start + q_len, device=device)[:, None])[None, None]

    monkeypatch.setattr("starflow.flow.block.attention_mask", explicit)
    slow = model.loss(x)
    slow.backward()
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)
    for a, p in zip(g_fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-5)


@pytest.fixture(scope="module")
def calibrated():
    """A float64 tiny model calibrated so loosely-thresholded Jacobi misses the tolerance somewhere."""
    torch.manual_seed(1)
    cfg = tiny_config(num_classes=3)
    model = perturbed(STARFlow(cfg)).double()
    g = torch.Generator().manual_seed(2)
    images = torch.randn(24, 1, 8, 8, generator=g).double()
    y = torch.randint(0, 3, (24,), generator=g)
    cal = calibrate(model, images, tolerance=1e-3, threshold=3e-2, batches=(1, 8), chunk=8, repeats=0, y=y)
    model.sampling_calibration = cal
    return model, images, y, cal


def test_auto_never_picks_a_plan_that_misses_its_tolerance(calibrated):
    model, images, y, cal = calibrated
    T_ = len(model.blocks)
    # Not vacuous: some single-block choice misses the tolerance on the calibration set.
    assert max(e for per in cal.block_error for e in per.values()) > cal.tolerance
    z = model(images, y=y)[0]
    ref = torch.cat([model.inverse(z[s:s + 8], y[s:s + 8]) for s in range(0, 24, 8)])
    for B in (1, 8):
        for sampler in ("auto", "selective", "segment"):
            plan, threshold = resolve_plan(sampler, T_, cal, B, "cpu")
            assert threshold == (cal.threshold if sampler == "auto" else None)
            assert plan == cal.plans[str(B)][sampler]["plan"]
            x = torch.cat([model.inverse(z[s:s + 8], y[s:s + 8], plan=plan, jacobi_threshold=cal.threshold)
                           for s in range(0, 24, 8)])
            err = (x - ref).abs().max().item()
            assert err <= cal.tolerance, (sampler, B, plan, err)
            assert err == pytest.approx(cal.plans[str(B)][sampler]["error"], abs=1e-12)
        # auto is the fastest of the verified plans it considered (selective's choices are a subset).
        assert cal.plans[str(B)]["auto"]["seconds"] <= cal.plans[str(B)]["selective"]["seconds"] + 1e-12
    # A tighter tolerance than calibrated, or another device: auto falls back to the exact sampler.
    assert resolve_plan("auto", T_, cal, 1, "cpu", tolerance=cal.tolerance / 10)[0] == [SEQUENTIAL] * T_
    cal_other = type(cal).from_dict({**cal.__dict__, "device": "some GPU"})
    assert resolve_plan("auto", T_, cal_other, 1, "cpu")[0] == [SEQUENTIAL] * T_
    with pytest.raises(ValueError, match="calibration"):
        resolve_plan("segment", T_, None, 1, "cpu")


def test_calibration_saved_and_loaded_with_the_model(calibrated, tmp_path):
    model, _, _, cal = calibrated
    model.save_pretrained(str(tmp_path))
    assert (tmp_path / CALIBRATION_NAME).exists()
    loaded = STARFlow.from_pretrained(str(tmp_path))
    assert loaded.sampling_calibration == cal
    assert load_calibration(str(tmp_path / "nowhere")) is None
    plain = perturbed(STARFlow(tiny_config()))
    plain.save_pretrained(str(tmp_path / "plain"))
    assert STARFlow.from_pretrained(str(tmp_path / "plain")).sampling_calibration is None
    (tmp_path / "plain" / CALIBRATION_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        STARFlow.from_pretrained(str(tmp_path / "plain"))


def test_plan_search_falls_back_when_the_combination_misses():
    """Choices that each pass alone but fail together: the plan search makes blocks exact until the
    whole plan, checked end to end, is within the tolerance."""
    from starflow.flow.selective_jacobi import _best_plan

    times = [{SEQUENTIAL: 1.0, "jacobi": 0.1}] * 3
    block_error = [{SEQUENTIAL: 0.0, "jacobi": 6e-4}, {SEQUENTIAL: 0.0, "jacobi": 8e-4}, {SEQUENTIAL: 0.0, "jacobi": 2e-3}]
    checked = []

    def run(plan):  # errors add up across blocks
        checked.append(list(plan))
        return sum(block_error[b][c] for b, c in enumerate(plan)), None

    best = _best_plan([[SEQUENTIAL, "jacobi"]] * 3, times, block_error, 1e-3, run, {})
    assert checked[0] == ["jacobi", "jacobi", SEQUENTIAL]  # block 2 misses alone; 0 and 1 together miss
    assert best["plan"] == ["jacobi", SEQUENTIAL, SEQUENTIAL]
    assert best["error"] == pytest.approx(6e-4) and best["seconds"] == pytest.approx(2.1)


def test_calibrations_of_several_devices_are_kept_and_auto_uses_this_devices(calibrated, tmp_path):
    model, _, _, cal = calibrated
    T_ = len(model.blocks)
    # Another device's calibration, whose plans differ from this one's.
    gpu_plans = {b: {k: {**v, "plan": ["jacobi"] * T_} for k, v in p.items()} for b, p in cal.plans.items()}
    gpu = type(cal).from_dict({**cal.__dict__, "device": "NVIDIA H200", "plans": gpu_plans})
    both = merge_calibrations(gpu, cal)
    assert [c.device for c in both] == ["NVIDIA H200", "cpu"]
    # auto takes this device's plan, whatever the order; with only the other device's, the exact sampler.
    for stored in (both, both[::-1]):
        assert resolve_plan("auto", T_, stored, 1, "cpu")[0] == cal.plans["1"]["auto"]["plan"]
    assert resolve_plan("auto", T_, [gpu], 1, "cpu")[0] == [SEQUENTIAL] * T_
    # selective / segment fall back to another device's calibration (their tolerance holds anywhere).
    assert resolve_plan("segment", T_, gpu, 8, "cpu")[0] == ["jacobi"] * T_
    # Re-calibrating a device replaces its entry and keeps the others.
    newer = type(cal).from_dict({**cal.__dict__, "num_images": cal.num_images + 1})
    merged = merge_calibrations(both, newer)
    assert [(c.device, c.num_images) for c in merged] == [("NVIDIA H200", cal.num_images), ("cpu", cal.num_images + 1)]
    assert merge_calibrations(cal, newer) == newer
    # Saved with the model and loaded back as they were.
    model.sampling_calibration = both
    try:
        model.save_pretrained(str(tmp_path))
    finally:
        model.sampling_calibration = cal
    assert STARFlow.from_pretrained(str(tmp_path)).sampling_calibration == both

