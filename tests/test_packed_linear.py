"""The decoder's packed-weight matmuls: the same numbers as F.linear, used only where they apply."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import starflow.nn.packed_linear as P
from conftest import perturbed, tiny_config
from starflow import STARFlow

needs_onednn = pytest.mark.skipif(not P._onednn_linear_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("rows", [4, 8, 32])
def test_packed_equals_f_linear(rows):
    torch.manual_seed(0)
    layer, x = nn.Linear(512, 384), torch.randn(rows, 512)  # big enough to be packed
    lin = P.PackedLinear(rows, x)
    assert lin.enabled
    with torch.no_grad():
        got, ref = lin(x, layer), F.linear(x, layer.weight, layer.bias)
        assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()
        layer.weight.mul_(-2.0)  # an in-place update (training between samples) must drop the packed copy
        assert torch.allclose(lin(x, layer), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_plain_path_where_packing_does_not_apply():
    x = torch.randn(32, 8)
    assert not P.PackedLinear(P.MIN_PACKED_ROWS - 1, x).enabled      # too few rows to pay
    assert not P.PackedLinear(32, x.double()).enabled                 # float64 reference runs
    assert not P.PackedLinear(32, x.bfloat16()).enabled
    assert not P.PackedLinear(32, x, enabled=False).enabled
    small = nn.Linear(8, 4)  # a weight too small to pay for packing
    with torch.no_grad():
        P.PackedLinear(32, x)(x, small)
    assert small.weight.numel() < P.MIN_PACKED_WEIGHT and small not in P._packed
    layer = nn.Linear(8, 4)
    with torch.enable_grad():  # autograd through a sample: the plain kernel, gradients intact
        out = P.PackedLinear(32, x)(x, layer)
        out.sum().backward()
    assert layer.weight.grad is not None


def test_sequential_sampler_with_packed_weights_matches_naive():
    torch.manual_seed(1)
    model = perturbed(STARFlow(tiny_config(num_classes=3)), scale=0.05)
    z = torch.randn(8, *model.image_shape, generator=torch.Generator().manual_seed(2))
    y = torch.arange(8) % 3
    with torch.no_grad():
        for g in (0.0, 2.0):
            ref = model.inverse(z, y, sampler="naive", guidance=g)
            assert (model.inverse(z, y, sampler="sequential", guidance=g) - ref).abs().max().item() < 1e-4
