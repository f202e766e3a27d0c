"""The weights' moving average: warm-up rule against a hand computation, and the fixed-decay option."""
from __future__ import annotations

import torch

from starflow.train.ema import make_ema, warmup_decay


def _run(warmup: bool, decay=0.9, steps=5):
    net = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema = make_ema(net, decay, warmup=warmup)
    values = []
    for k in range(1, steps + 1):
        with torch.no_grad():
            net.weight.fill_(float(k))
        ema.update_parameters(net)
        values.append(ema.module.weight[0, 0].item())
    return values


def test_warmup_decay_rule():
    assert warmup_decay(0.999, 0) == 0.1 and warmup_decay(0.999, 1) == 2 / 11
    assert warmup_decay(0.999, 10 ** 6) == 0.999 and warmup_decay(0.5, 100) == 0.5


def test_ema_follows_the_warmup_by_hand():
    # first update copies the weights; the n-th after it lerps by 1 - min(decay, (1 + n) / (10 + n))
    expected, e = [], None
    for k in range(1, 6):
        if e is None:
            e = float(k)
        else:
            d = min(0.9, (1 + (k - 1)) / (10 + (k - 1)))
            e = d * e + (1 - d) * k
        expected.append(e)
    got = _run(warmup=True)
    assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-6
    # without warm-up: the fixed decay from the second update on, which lags the weights far more early on
    fixed = _run(warmup=False)
    e, want = 1.0, [1.0]
    for k in range(2, 6):
        e = 0.9 * e + 0.1 * k
        want.append(e)
    assert max(abs(a - b) for a, b in zip(fixed, want)) < 1e-6
    assert got[-1] > fixed[-1]
