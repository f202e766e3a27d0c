"""The one home of the uint8 <-> model-space conversions, dequantisation and bits/dim."""
import math

import torch

from starflow.data import spaces

PIXELS = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)


def test_bin_map_round_trips_every_value_from_centres_and_from_noise():
    assert torch.equal(spaces.bins_to_uint8(spaces.bin_centres(PIXELS)), PIXELS)
    y = spaces.dequantize(PIXELS, generator=torch.Generator().manual_seed(0))
    assert y.min() >= -1 and y.max() < 1
    assert torch.equal(spaces.bins_to_uint8(y), PIXELS)
    # the bin edges: noise 0 keeps the value, noise just below 1 still does
    assert torch.equal(spaces.bins_to_uint8(spaces.add_dequantization_noise(PIXELS, 0.0)), PIXELS)
    assert torch.equal(spaces.bins_to_uint8(spaces.add_dequantization_noise(PIXELS, 0.999)), PIXELS)


def test_linear_map_hits_the_ends_and_round_trips():
    x = spaces.uint8_to_linear(PIXELS)
    assert x.flatten()[0] == -1 and x.flatten()[-1] == 1
    assert torch.equal(spaces.linear_to_uint8(x), PIXELS)
    assert torch.equal(spaces.linear_to_uint8(torch.tensor([-3.0, 3.0])), torch.tensor([0, 255], dtype=torch.uint8))


def test_dequantize_is_reproducible_per_generator():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(spaces.dequantize(PIXELS, g()), spaces.dequantize(PIXELS, g()))
    assert not torch.equal(spaces.dequantize(PIXELS, g()), spaces.dequantize(PIXELS, torch.Generator().manual_seed(4)))


def test_bits_per_dim_formula():
    # a uniform density on [-1, 1]^D has NLL ln 2 nats/dim in y space -> exactly 8 bits per 8-bit value
    assert spaces.bits_per_dim(math.log(2)) == 8.0
    assert torch.allclose(spaces.bits_per_dim(torch.tensor([0.0, math.log(2)])), torch.tensor([7.0, 8.0]))


def test_the_flow_reports_bits_per_dim_through_the_shared_formula(tiny_model):
    images = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    expected = spaces.bits_per_dim(tiny_model.nll(spaces.dequantize(images, torch.Generator().manual_seed(1)), y))
    assert torch.equal(tiny_model.bits_per_dim(images, y, generator=torch.Generator().manual_seed(1)), expected)
