"""The one post-processing step (Tweedie or fine-tuned decoder, then decode) shared by sampling,
inpainting and editing."""
import pytest
import torch

from starflow.components.denoise import tweedie_denoise
from starflow.components.postprocess import denoise_and_decode
from starflow.pipeline import StarflowPipeline


class Halve(torch.nn.Module):  # a stand-in autoencoder: decode halves
    def decode(self, z):
        return z / 2


def test_tweedie_then_decode_and_clamp(tiny_model):
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2])
    log_prob = lambda v: tiny_model.log_prob(v, y)  # noqa: E731
    expected = (tweedie_denoise(log_prob, x, 0.2) / 2).clamp(-1, 1)
    assert torch.equal(denoise_and_decode(x, "tweedie", 0.2, log_prob, Halve()), expected)
    # decoder / none / no noise / no exact density: decode only
    for args in (("decoder", 0.2, log_prob), ("none", 0.2, log_prob), ("tweedie", 0.0, log_prob), ("tweedie", 0.2, None)):
        assert torch.equal(denoise_and_decode(x, *args, autoencoder=Halve()), (x / 2).clamp(-1, 1))


def test_keep_restores_the_given_region_after_denoising(tiny_model):
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    known = torch.zeros_like(x)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., :4] = True
    out = denoise_and_decode(x, "tweedie", 0.3, lambda v: tiny_model.log_prob(v), keep=(mask, known))
    assert torch.equal(out[mask], known[mask])
    assert not torch.equal(out[~mask], x[~mask].clamp(-1, 1))  # the rest was denoised


def test_unknown_method_is_refused_by_the_step_and_the_pipeline(tiny_model):
    with pytest.raises(ValueError, match="unknown denoise"):
        denoise_and_decode(torch.zeros(1, 1, 8, 8), "blur", 0.1)
    with pytest.raises(ValueError, match="unknown denoise"):
        StarflowPipeline(tiny_model, denoise="blur")


def test_the_pipeline_finishes_through_the_shared_step(tiny_model):
    pipe = StarflowPipeline(tiny_model, noise_std=0.2)
    y = torch.tensor([1, 2])
    raw = tiny_model.sample(2, y=y, generator=torch.Generator().manual_seed(0))
    expected = denoise_and_decode(raw, "tweedie", 0.2, lambda v: tiny_model.log_prob(v, y))
    assert torch.equal(pipe.sample(2, y=y, generator=torch.Generator().manual_seed(0)), expected)


def test_decoder_swap_keeps_the_latent_space_or_refuses():
    """--decoder: a decoder fine-tuned from (or aligned to) the model's autoencoder replaces it; one of
    another latent space is refused before it can turn samples into noise."""
    from starflow.errors import ConfigError

    pipe = StarflowPipeline.from_pretrained("mnist", decoder="mnist_ft", denoise="decoder")
    assert pipe.denoise == "decoder" and pipe.autoencoder.decoder_noise_sigma == 0.3  # the σ = 0.3 decoder
    shipped = StarflowPipeline.from_pretrained("mnist")
    # a clean decoder: trained on clean latents (train-autoencoder --align-to, then finetune-decoder --sigma 0)
    assert shipped.denoise == "tweedie" and not shipped.autoencoder.decoder_noise_sigma
    x = torch.zeros(1, 4, 7, 7)
    assert not torch.equal(pipe.autoencoder.decode(x), shipped.autoencoder.decode(x))
    with pytest.raises(ConfigError, match="latent space"):
        StarflowPipeline.from_pretrained("mnist", decoder="shapes")
    with pytest.raises(ConfigError, match="not a latent model"):
        StarflowPipeline.from_pretrained("mnist-pixel", decoder="mnist")


def test_aligned_autoencoder_shares_its_reference_latent_space():
    from starflow.components.autoencoder import load_default_autoencoder

    ref, aligned = load_default_autoencoder("shapes"), load_default_autoencoder("shapes64")
    assert aligned.encoder_fingerprint() != ref.encoder_fingerprint()
    assert aligned.latent_space_fingerprint() == ref.latent_space_fingerprint()


def test_draws_that_overflow_are_drawn_again_with_their_own_condition(tiny_model, monkeypatch):
    """A tail draw whose inverse overflows float range costs that image a redraw, not the batch; a model
    that always overflows still returns non-finite images (for the caller's NaN check to name)."""
    import starflow.pipeline as P

    pipe = StarflowPipeline(tiny_model)
    y = torch.tensor([0, 1, 2])
    plain = tiny_model.sample(3, y=y, generator=torch.Generator().manual_seed(0))
    real_sample, calls = tiny_model.sample, []

    def overflow_first_call(n, **kw):
        x = real_sample(n, **kw)
        calls.append(kw["cond"].labels.clone())
        if len(calls) == 1:
            x[1] = float("nan")
        return x

    monkeypatch.setattr(tiny_model, "sample", overflow_first_call)
    with pytest.warns(UserWarning, match="1 of 3 draws overflowed"):
        x = pipe.sample(3, y=y, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all() and len(calls) == 2
    assert torch.equal(x[[0, 2]], plain[[0, 2]].clamp(-1, 1))  # the good draws are kept as drawn
    assert all(torch.equal(c, y) for c in calls)  # the redraw samples every row with its own label
    assert not torch.equal(x[1], plain[1].clamp(-1, 1))  # a fresh draw from the same generator

    monkeypatch.setattr(tiny_model, "sample", lambda n, **kw: real_sample(n, **kw) * float("nan"))
    with pytest.warns(UserWarning):
        assert torch.isnan(pipe.sample(2, y=y[:2])).all()
    assert P.MAX_REDRAWS == 3
