"""The models that ship in the package load offline and work, and keep the figures the README quotes."""
import torch

from starflow.io.shipped import DEFAULT_DIGITS_MODEL, DEFAULT_TEXT_MODEL
from starflow.pipeline import StarflowPipeline


def test_shipped_mnist_model_samples_and_scores():
    from starflow.data import DigitsDataset

    pipe = StarflowPipeline.from_pretrained(DEFAULT_DIGITS_MODEL)
    assert pipe.num_classes == 10 and pipe.image_shape == (1, 28, 28)
    images = pipe(class_label=3, num_images=2, generator=torch.Generator().manual_seed(0))
    assert images[0].size == (28, 28)
    test = DigitsDataset("mnist", "test")
    idx = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:100]
    bpd = pipe.bits_per_dim(test.images[idx], test.labels[idx], generator=torch.Generator().manual_seed(0))
    assert 5.0 < bpd.mean().item() < 6.0  # README: 5.57 on the whole split


def test_shipped_text_model_follows_prompts():
    pipe = StarflowPipeline.from_pretrained(DEFAULT_TEXT_MODEL)
    assert pipe.is_text_conditional and pipe.image_shape == (3, 32, 32)
    images = pipe("a red circle", num_images=2, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert images[0].size == (32, 32) and images[0].mode == "RGB"
    a = pipe.sample(1, prompt="a red circle", generator=torch.Generator().manual_seed(1))
    b = pipe.sample(1, prompt="a blue square", generator=torch.Generator().manual_seed(1))
    # same noise, different prompt: the red channel dominates only for the red prompt
    red = lambda x: (x[0, 0] - x[0, 2]).mean().item()  # noqa: E731
    assert red(a) > red(b)
