"""Object detection for ShapesEval: colour segmentation, connected components and shape templates.

Each pixel gets the palette colour of the nearest hue (HSV hue; pixels more than ``HUE_TOLERANCE``
degrees from every palette hue belong to none) and a membership ``chroma / palette chroma`` in [0, 1]:
blending with the black background changes brightness and chroma but not hue, so anti-aliased, blurred
or dimmed objects keep their colour. Objects are the 8-connected components of
``membership >= DETECT_THRESHOLD`` per colour with soft area of at least ``MIN_AREA_PX`` (at 32x32) and
typical membership ``MIN_PEAK``; the shape is the best template of the same soft area and centroid by
soft IoU, if at least ``MIN_SHAPE_IOU`` (else ``"unknown"``). Claim checking lives in ``shapes_eval``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from starflow.data.shapes_specs import COLOURS, PALETTE, SHAPES

HUE_TOLERANCE = 40.0  # degrees from a palette hue
DETECT_THRESHOLD = 0.35  # membership for a pixel to join an object
MIN_PEAK = 0.5  # 80th-percentile membership an object needs (faint smudges are not objects)
MIN_AREA_PX = 10.0  # soft area at 32x32 (the smallest real object, a radius-4 triangle, has 32)
MIN_SHAPE_IOU = 0.6
TEMPLATE_SUPERSAMPLE = 4
#: Gaussian blurs (px at 32x32) tried on each template, so blurry samples match the right shape.
TEMPLATE_BLURS = (0.0, 0.6, 1.0, 1.4)


def _hue_chroma(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV hue in degrees [0, 360) and chroma (max - min) of float RGB in [0, 1], shape [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = mx - mn
    safe = np.where(c > 0, c, 1.0)
    h = np.where(mx == r, ((g - b) / safe) % 6.0, np.where(mx == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    return (h * 60.0) % 360.0, c


_PAL = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64) / 255.0
PALETTE_HUES, PALETTE_CHROMA = _hue_chroma(_PAL)


@dataclass(frozen=True)
class Detection:
    """One detected object, in pixel coordinates (x right, y down, pixel edges at integers)."""

    shape: str  # one of SHAPES or "unknown"
    colour: str
    centre: tuple[float, float]  # centre of the fitted shape's bounding box
    radius: float  # half the fitted bounding-box side, px
    area: float  # soft area, px
    iou: float  # soft IoU of the best template
    ious: dict  # shape -> IoU

    def as_dict(self) -> dict:
        return {
            "shape": self.shape, "colour": self.colour, "centre": tuple(round(v, 2) for v in self.centre),
            "radius": round(self.radius, 2), "area": round(self.area, 1), "iou": round(self.iou, 3),
        }


# ----------------------------------------------------------------------------------------------
# Input handling
# ----------------------------------------------------------------------------------------------


def as_float_image(image) -> np.ndarray:
    """Accept a uint8 (or integer 0..255) or float-in-[0,1] image as numpy, torch or PIL, laid out
    [H, W, 3] or [3, H, W]; return float64 [H, W, 3] in [0, 1]."""
    try:
        from PIL import Image

        if isinstance(image, Image.Image):
            image = np.asarray(image.convert("RGB"))
    except ImportError:  # pragma: no cover
        pass
    if hasattr(image, "detach") and hasattr(image, "cpu"):  # torch tensor
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image as numpy array, torch tensor or PIL image, got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"expected one RGB image [H,W,3] or [3,H,W], got shape {tuple(image.shape)}")
    if image.shape[-1] == 3:
        arr = image
    elif image.shape[0] == 3:
        arr = image.transpose(1, 2, 0)
    else:
        raise ValueError(f"expected 3 colour channels first or last, got shape {tuple(image.shape)}")
    if min(arr.shape[:2]) < 8:
        raise ValueError(f"image too small to score: {tuple(arr.shape[:2])}")
    if arr.dtype == np.bool_:
        raise ValueError("boolean arrays are not images")
    if np.issubdtype(arr.dtype, np.integer):
        if arr.dtype != np.uint8 and (arr.min() < 0 or arr.max() > 255):
            raise ValueError("integer images must have values in 0..255")
        return arr.astype(np.float64) / 255.0
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float64)
        if not np.isfinite(arr).all():
            raise ValueError("image contains NaN or infinite values")
        if arr.min() < -0.01 or arr.max() > 1.01:
            raise ValueError(
                f"float images must be in [0, 1] (got range [{arr.min():.3g}, {arr.max():.3g}]); "
                "convert from [-1, 1] with (x + 1) / 2 or pass uint8")
        return np.clip(arr, 0.0, 1.0)
    raise ValueError(f"unsupported image dtype {arr.dtype}")


# ----------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------


def colour_membership(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: palette index (-1: none) and membership in [0, 1]."""
    hue, chroma = _hue_chroma(img)
    d = np.abs(hue[..., None] - PALETTE_HUES)
    d = np.minimum(d, 360.0 - d)
    k = d.argmin(-1)
    cls = np.where(d.min(-1) <= HUE_TOLERANCE, k, -1)
    m = np.clip(chroma / PALETTE_CHROMA[k], 0.0, 1.0)
    m = np.where(cls >= 0, m, 0.0)
    return cls, m


def _template(shape: str, xs: np.ndarray, ys: np.ndarray, cx: float, cy: float, r: float) -> np.ndarray:
    """Coverage in [0,1] of a shape (box [cx-r,cx+r]x[cy-r,cy+r]) on the pixel grid with edges xs/ys
    (1-D arrays of pixel left/top edges), by TEMPLATE_SUPERSAMPLE^2 point sampling."""
    s = TEMPLATE_SUPERSAMPLE
    off = (np.arange(s) + 0.5) / s
    px = (xs[:, None] + off[None, :]).ravel()
    py = (ys[:, None] + off[None, :]).ravel()
    X, Y = px[None, :], py[:, None]
    if shape == "circle":
        inside = (X - cx) ** 2 + (Y - cy) ** 2 <= r * r
    elif shape == "square":
        inside = (np.abs(X - cx) <= r) & (np.abs(Y - cy) <= r)
    elif shape == "triangle":
        inside = (Y <= cy + r) & (np.abs(X - cx) <= (Y - (cy - r)) / 2.0)
    else:
        raise ValueError(shape)
    h, w = len(ys), len(xs)
    return inside.reshape(h, s, w, s).mean(axis=(1, 3))


@functools.lru_cache(maxsize=512)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """[n, n] matrix applying a Gaussian blur (zero outside the window) along one axis."""
    i = np.arange(n)
    d = i[:, None] - i[None, :]
    radius = int(4 * sigma + 0.5)
    k = np.exp(-0.5 * (d / sigma) ** 2) * (np.abs(d) <= radius)
    full = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).sum()
    return k / full


# For a shape of soft area A: radius (half box side) and offset of the area centroid below the box centre.
_RADIUS_FROM_AREA = {"circle": lambda a: np.sqrt(a / np.pi), "square": lambda a: np.sqrt(a) / 2.0,
                     "triangle": lambda a: np.sqrt(a / 2.0)}
_CENTROID_DROP = {"circle": 0.0, "square": 0.0, "triangle": 1.0 / 3.0}


def detect_objects(image) -> list[Detection]:
    """Find the coloured objects in an image (see the module docstring)."""
    from scipy import ndimage

    img = as_float_image(image)
    H, W = img.shape[:2]
    scale = min(H, W) / 32.0
    min_area = MIN_AREA_PX * scale * scale
    cls, m = colour_membership(img)
    structure = np.ones((3, 3), bool)
    out: list[Detection] = []
    for k, colour in enumerate(COLOURS):
        mk = np.where(cls == k, m, 0.0)
        labels, n = ndimage.label(mk >= DETECT_THRESHOLD, structure=structure)
        if n == 0:
            continue
        slices = ndimage.find_objects(labels)
        for lab, sl in enumerate(slices, start=1):
            comp = labels[sl] == lab
            peak = float(np.percentile(mk[sl][comp], 80))
            if peak < MIN_PEAK:
                continue
            # window: the component's box plus a margin for its anti-aliased / blurred rim
            pad = int(np.ceil(2 * scale)) + 1
            y0, y1 = max(sl[0].start - pad, 0), min(sl[0].stop + pad, H)
            x0, x1 = max(sl[1].start - pad, 0), min(sl[1].stop + pad, W)
            lw = labels[y0:y1, x0:x1]
            soft = np.clip(mk[y0:y1, x0:x1] / peak, 0.0, 1.0)
            soft = np.where((lw == 0) | (lw == lab), soft, 0.0)  # drop other objects of the same colour
            # keep the rim only next to this component (dilate it by the pad)
            near = ndimage.binary_dilation(lw == lab, structure=structure, iterations=pad)
            soft = np.where(near, soft, 0.0)
            area = float(soft.sum())
            if area < min_area:
                continue
            ys = np.arange(y0, y1, dtype=np.float64)
            xs = np.arange(x0, x1, dtype=np.float64)
            gx = float((soft.sum(0) * (xs + 0.5)).sum() / area)
            gy = float((soft.sum(1) * (ys + 0.5)).sum() / area)
            ious, fits = {}, {}
            for shape in SHAPES:
                r = float(_RADIUS_FROM_AREA[shape](area))
                cx, cy = gx, gy - _CENTROID_DROP[shape] * r
                t0 = _template(shape, xs, ys, cx, cy, r)
                best_iou = 0.0
                for sigma in TEMPLATE_BLURS:
                    if sigma > 0:
                        t = _blur_matrix(len(ys), sigma * scale) @ t0 @ _blur_matrix(len(xs), sigma * scale).T
                    else:
                        t = t0
                    iou = float(np.minimum(t, soft).sum() / max(np.maximum(t, soft).sum(), 1e-9))
                    best_iou = max(best_iou, iou)
                ious[shape] = best_iou
                fits[shape] = (cx, cy, r)
            best = max(ious, key=ious.get)
            cx, cy, r = fits[best]
            shape = best if ious[best] >= MIN_SHAPE_IOU else "unknown"
            out.append(Detection(shape, colour, (cx, cy), r, area, ious[best], ious))
    return out
