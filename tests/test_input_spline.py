"""The input spline (starflow/flow/input_spline.py): exact, and it does the one thing it is for — fit the
box-shaped density of a dequantised pixel the flow already knows better than any Gaussian can."""
import math

import pytest
import torch

from conftest import tiny_config
from starflow import STARFlow, TrainConfig
from starflow.data import DigitsDataset
from starflow.errors import ConfigError
from starflow.flow.input_spline import InputSpline
from starflow.train.build import _start_from
from starflow.train.trainer import Trainer


def test_round_trip_and_logdet_against_autograd():
    torch.manual_seed(0)
    spline = InputSpline(2, 5, bound=1.0).double()
    for p in spline.parameters():
        p.data.normal_()
    x = torch.rand(1, 2, 3, 3, dtype=torch.float64) * 2.4 - 1.2  # some values outside the bound: identity there
    y, logdet = spline(x)
    assert (spline.inverse(y) - x).abs().max().item() < 1e-12
    outside = x.abs() > 1
    assert torch.equal(y[outside], x[outside]) and not torch.allclose(y[~outside], x[~outside])
    jac = torch.autograd.functional.jacobian(lambda t: spline(t.view_as(x))[0].flatten(), x.flatten())
    assert logdet.item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)


def test_fits_a_box_better_than_the_best_gaussian():
    """Data U[-1, -1 + h] (a black pixel's dequantisation noise, h = 2/256): the best Gaussian pays
    log h + 0.5 log(2 pi e / 12) nats; spline + affine + N(0, 1) must get well below that."""
    torch.manual_seed(0)
    h = 2 / 256
    x = -1 + h * torch.rand(4096, 1, 1, 1)
    spline = InputSpline(1, 24)
    # the affine starts at the best Gaussian's mean and log std: what is gained below it is the spline's
    shift = torch.full((1,), x.mean().item(), requires_grad=True)
    log_scale = torch.full((1,), x.std().log().item(), requires_grad=True)
    opt = torch.optim.Adam([*spline.parameters(), shift, log_scale], lr=1e-2)

    def nll():
        y, logdet = spline(x)
        z = (y - shift) * torch.exp(-log_scale)
        return (0.5 * z.flatten() ** 2 + 0.5 * math.log(2 * math.pi) - logdet + log_scale).mean()

    for _ in range(400):
        opt.zero_grad()
        loss = nll()
        loss.backward()
        opt.step()
    best_gaussian = math.log(h) + 0.5 * math.log(2 * math.pi * math.e / 12)
    entropy = math.log(h)  # the box's own: no model can go below it
    assert entropy - 1e-3 < nll().item() < best_gaussian - 0.07


def test_init_from_adds_an_identity_spline_that_trains_in_its_own_group(tmp_path):
    torch.manual_seed(0)
    base = STARFlow(tiny_config(num_classes=10))
    base.save_pretrained(str(tmp_path / "base"))
    model = STARFlow(tiny_config(num_classes=10, input_spline_bins=8))
    _start_from(model, str(tmp_path / "base"))
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    y = torch.tensor([1, 2])
    torch.testing.assert_close(model.log_prob(x, y), base.log_prob(x, y), rtol=0, atol=1e-5)

    cfg = TrainConfig(dataset="digits", out_dir=str(tmp_path / "run"), steps=3, batch_size=8, log_every=1,
                      ckpt_every=3, sample_every=100, warmup_steps=1, lr=1e-3, input_spline_lr_mult=20.0)
    trainer = Trainer(model, DigitsDataset("digits", "train"), cfg)
    start = model.input_spline.widths.detach().clone()
    trainer.train()
    rest, spline = trainer.opt.param_groups
    assert [id(p) for p in spline["params"]] == [id(p) for p in model.input_spline.parameters()]
    assert spline["weight_decay"] == 0.0 and rest["weight_decay"] == cfg.weight_decay
    assert spline["lr"] == pytest.approx(20.0 * rest["lr"])
    assert not torch.equal(model.input_spline.widths, start)  # it trained


def test_init_from_keeps_a_spline_it_starts_with_and_rejects_changing_it(tmp_path):
    """Only *adding* a spline frees its fields; a start that has one must match it, and removing it is an error."""
    torch.manual_seed(0)
    STARFlow(tiny_config(input_spline_bins=8)).save_pretrained(str(tmp_path / "spline8"))
    for changed in (dict(input_spline_bins=16), dict(input_spline_bins=8, input_spline_bound=2.0), {}):
        with pytest.raises(ConfigError, match="input_spline"):
            _start_from(STARFlow(tiny_config(**changed)), str(tmp_path / "spline8"))
    same = STARFlow(tiny_config(input_spline_bins=8))
    _start_from(same, str(tmp_path / "spline8"))
    start = STARFlow.from_pretrained(str(tmp_path / "spline8"))
    torch.testing.assert_close(same.input_spline.widths, start.input_spline.widths, rtol=0, atol=0)
