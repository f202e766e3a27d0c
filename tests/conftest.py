import os

import pytest
import torch

from starflow import FlowConfig, STARFlow

# Tiny test models gain nothing from threads, and oversubscribed cores make them crawl.
torch.set_num_threads(1)
# ...and CLI calls in-process keep it so (their --threads default is "auto").
os.environ.setdefault("STARFLOW_THREADS", "1")

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")


def perturbed(model: STARFlow, scale: float = 0.05, seed: int = 0) -> STARFlow:
    """A freshly built flow is the identity (zero output layers); perturb every weight so tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def tiny_config(**kw) -> FlowConfig:
    base = dict(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=3,
                layers_per_block=1, deep_layers=2)
    base.update(kw)
    return FlowConfig(**base)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return perturbed(STARFlow(tiny_config(num_classes=3)))


def assert_blocks_causal(model, x, kw, B: int = 2):
    """Perturbing token j of any block's input changes no output at positions <= j, and changes j + 1."""
    cond = model.make_condition(B, kw.get("y"), kw.get("text"))
    tokens = model.patchify(x)
    L = tokens.shape[1]
    for block in model.blocks:
        ctx = block.context(cond if block.conditional else None, B, x.device)
        xp = tokens[:, ctx.perm]
        base = block.predict(xp, ctx)
        for j in (0, L // 2, L - 1):
            bumped = xp.clone()
            bumped[:, j] += 1.0
            out = block.predict(bumped, ctx)
            assert torch.equal(out[:, :j + 1], base[:, :j + 1])
            if j + 1 < L:
                assert not torch.allclose(out[:, j + 1], base[:, j + 1])


def assert_logdet_matches_jacobian(model, x, kw):
    """The flow's exact log|det dz/dx| equals the autograd Jacobian's (float64 inputs; not trivially 0)."""
    def f(flat):
        return model(flat.view_as(x), **kw)[0].flatten()

    jac = torch.autograd.functional.jacobian(f, x.flatten())
    _, expected = torch.linalg.slogdet(jac)
    _, logdet = model(x, **kw)
    assert abs(logdet.item()) > 1e-3
    assert logdet.item() == pytest.approx(expected.item(), abs=1e-8)
