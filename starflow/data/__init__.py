"""Datasets: real digits shipped in packages, users' image folders, and (later) captioned shapes."""
from starflow.data.digits import load_mnist_subset, load_sklearn_digits, DigitsDataset
from starflow.data.folder import ImageFolderDataset
from starflow.data.registry import build_dataset

__all__ = ["load_mnist_subset", "load_sklearn_digits", "DigitsDataset", "ImageFolderDataset", "build_dataset"]
