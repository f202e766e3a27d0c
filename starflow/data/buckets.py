"""Aspect-ratio buckets (the STARFlow paper trains its text model on 9 shape buckets).

Each image goes to the bucket whose aspect ratio is nearest its own (in log space), is resized to
cover the bucket and centre-cropped to it. A batch always comes from one bucket, so every batch is
one tensor; the model reads a bucket's token grid as a sub-grid of its position table.
"""
from __future__ import annotations

import math

import torch
from PIL import Image


def parse_aspect(text: str) -> float:
    """'16:9' -> 16/9 (width over height)."""
    try:
        w, h = (float(v) for v in text.split(":"))
        if w <= 0 or h <= 0:
            raise ValueError
    except ValueError:
        raise ValueError(f"aspect ratio must look like W:H with positive numbers, e.g. 16:9; got {text!r}") from None
    return w / h


def nearest_bucket(sizes: list[tuple[int, int]], aspect: float) -> tuple[int, int]:
    """The (H, W) in ``sizes`` whose W/H is nearest ``aspect`` in log ratio (ties: the larger area)."""
    return min(sizes, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - math.log(aspect)), -hw[0] * hw[1]))


def fit_to_bucket(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize to cover (H, W) and centre-crop to it."""
    h, w = size
    scale = max(w / image.width, h / image.height)
    im = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
    left, top = (im.width - w) // 2, (im.height - h) // 2
    return im.crop((left, top, left + w, top + h))


class BucketBatches:
    """Batches of indices, each from a single bucket: shuffled within buckets and in batch order by a
    seeded generator per epoch (so a resumed run sees the same batches). Drops each bucket's remainder."""

    def __init__(self, bucket_of: list[int], batch_size: int, seed: int = 0):
        self.bucket_of = torch.as_tensor(bucket_of)
        self.batch_size, self.seed = batch_size, seed
        sizes = torch.bincount(self.bucket_of)
        if int((sizes // batch_size).sum()) == 0:
            raise ValueError(f"no bucket holds a full batch of {batch_size}; bucket sizes {sizes.tolist()}")

    def epoch(self, epoch: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
        batches = []
        for b in torch.unique(self.bucket_of).tolist():
            idx = torch.nonzero(self.bucket_of == b).flatten()
            idx = idx[torch.randperm(len(idx), generator=g)]
            batches += [idx[i:i + self.batch_size] for i in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        order = torch.randperm(len(batches), generator=g)
        return [batches[i] for i in order]

    def __len__(self) -> int:
        return int((torch.bincount(self.bucket_of) // self.batch_size).sum())


class BucketedImages:
    """Images of mixed sizes assigned to buckets; ``get_batch`` returns one bucket's tensor."""

    def __init__(self, images: list[Image.Image], labels: list[int], sizes: list[tuple[int, int]], channels: int = 3):
        self.sizes = [tuple(s) for s in sizes]
        self.labels = torch.as_tensor(labels)
        self.bucket_of, self.tensors = [], []
        for im in images:
            b = self.sizes.index(nearest_bucket(self.sizes, im.width / im.height))
            fitted = fit_to_bucket(im.convert("L" if channels == 1 else "RGB"), self.sizes[b])
            t = torch.as_tensor(bytearray(fitted.tobytes()), dtype=torch.uint8)
            t = t.view(fitted.height, fitted.width, channels).permute(2, 0, 1).contiguous()
            self.bucket_of.append(b)
            self.tensors.append(t)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """The largest bucket's shape (the model's square size is among the buckets)."""
        h, w = max(self.sizes, key=lambda hw: hw[0] * hw[1])
        return (self.tensors[0].shape[0], h, w)

    def num_batches(self, batch_size: int) -> int:
        return len(BucketBatches(self.bucket_of, batch_size))

    def epoch_batches(self, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
        """The trainer's batch plan: every batch from one bucket, reproducible from (seed, epoch)."""
        return BucketBatches(self.bucket_of, batch_size, seed).epoch(epoch)

    def get_batch(self, idx: torch.Tensor):
        buckets = {self.bucket_of[int(i)] for i in idx}
        if len(buckets) != 1:
            raise ValueError(f"a batch must come from one bucket, got buckets {sorted(buckets)}")
        return torch.stack([self.tensors[int(i)] for i in idx]), self.labels[idx]
