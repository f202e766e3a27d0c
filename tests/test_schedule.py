"""The one learning-rate schedule (warm-up then cosine) used by the flow and autoencoder trainers."""
import math

from starflow.train.config import TrainConfig
from starflow.train.schedule import warmup_cosine
from starflow.train.trainer import lr_factor


def test_warmup_is_linear_then_cosine_to_the_floor():
    assert [warmup_cosine(s, 100, 4, 0.1) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 100, 4, 0.1) == 1.0
    assert math.isclose(warmup_cosine(52, 100, 4, 0.1), 0.1 + 0.9 * 0.5)
    assert math.isclose(warmup_cosine(100, 100, 4, 0.1), 0.1) and warmup_cosine(500, 100, 4, 0.1) == 0.1
    values = [warmup_cosine(s, 100, 4, 0.1) for s in range(4, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_the_flow_trainer_reads_its_config_through_it():
    cfg = TrainConfig(steps=50, warmup_steps=5, min_lr_ratio=0.2)
    assert [lr_factor(s, cfg) for s in range(60)] == [warmup_cosine(s, 50, 5, 0.2) for s in range(60)]
