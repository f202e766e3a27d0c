"""Shifted-copy augmentation: exact shifts, labels carried, wired into the trainer's config."""
import pytest
import torch

from starflow.data.augment import ShiftedCopies, shift_images
from starflow.data.tensors import LabelledImages
from starflow.errors import ConfigError
from starflow.train.config import TrainConfig


class Tiny(LabelledImages):
    num_classes = 3

    def __init__(self):
        self.images = torch.zeros(2, 1, 5, 5, dtype=torch.uint8)
        self.images[0, 0, 2, 2] = 255          # a dot in the middle
        self.images[1, 0, 1, 3] = 100
        self.labels = torch.tensor([0, 2])


def test_shift_moves_pixels_and_repeats_the_edge():
    img = Tiny().images
    down_right = shift_images(img, 1, 2)
    assert down_right[0, 0, 3, 4] == 255 and down_right[0].sum() == 255
    ramp = torch.arange(5, dtype=torch.uint8).repeat(5, 1)[None, None]  # columns 0..4
    assert shift_images(ramp, 0, 1)[0, 0, 0].tolist() == [0, 0, 1, 2, 3]  # left edge repeated
    assert torch.equal(shift_images(img, 0, 0), img)


def test_shifted_copies_keep_originals_first_and_labels():
    base = Tiny()
    aug = ShiftedCopies(base, 1)
    assert aug.copies == 9 and len(aug) == 18 and aug.num_classes == 3
    assert torch.equal(aug.images[:2], base.images)
    assert aug.labels.tolist() == [0, 2] * 9
    centres = {tuple((im[0] == 255).nonzero()[0].tolist()) for im in aug.images[0::2]}
    assert centres == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}  # every shift of the dot, once
    with pytest.raises(ValueError, match="labelled image dataset"):
        ShiftedCopies(object(), 1)


def test_config_range():
    assert TrainConfig(shift_augment=2).shift_augment == 2
    with pytest.raises(ConfigError, match="shift_augment"):
        TrainConfig(shift_augment=-1)
