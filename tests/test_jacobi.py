"""Jacobi decoding on a (briefly) trained model: same samples as sequential, fewer sweeps than tokens."""
import pytest
import torch

from starflow import STARFlow, TrainConfig
from starflow.data import DigitsDataset
from starflow.train.trainer import Trainer
from conftest import tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.manual_seed(0)
    model = STARFlow(tiny_config(num_classes=10, num_blocks=2))
    cfg = TrainConfig(dataset="digits", out_dir=str(tmp_path_factory.mktemp("jac")), steps=60, batch_size=32,
                      lr=3e-3, warmup_steps=5, log_every=60, ckpt_every=60, sample_every=1000)
    return Trainer(model, DigitsDataset("digits"), cfg).train() and model.eval()


def test_jacobi_equals_sequential_on_trained_model(trained):
    y = torch.arange(8) % 10
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    seq = trained.sample(8, y=y, generator=g())
    for window in (0, 4):
        jac = trained.sample(8, y=y, generator=g(), sampler="jacobi", jacobi_threshold=1e-6, jacobi_window=window)
        assert (jac - seq).abs().max().item() < 1e-4
    guided_seq = trained.sample(8, y=y, generator=g(), guidance=2.0)
    guided_jac = trained.sample(8, y=y, generator=g(), guidance=2.0, sampler="jacobi", jacobi_threshold=1e-6)
    assert (guided_jac - guided_seq).abs().max().item() < 1e-4


def test_jacobi_stops_early_when_converged(trained):
    L = trained.config.num_tokens
    _, stats = trained.sample(8, y=torch.arange(8) % 10, sampler="jacobi", jacobi_threshold=1e-3, return_stats=True)
    iters = stats.sweeps()
    assert len(iters) == trained.config.num_blocks
    assert max(iters) < L, f"Jacobi used {iters} sweeps for {L} tokens"
    # A cap below the window length is honoured.
    _, stats = trained.sample(2, y=torch.arange(2), sampler="jacobi", jacobi_threshold=1e-12, jacobi_max_iters=2,
                              return_stats=True)
    assert stats.sweeps() == [2, 2]
