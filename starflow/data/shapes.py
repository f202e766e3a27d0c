"""Procedurally generated, captioned "shapes" scenes for text-to-image training and ShapesEval.

Every scene is a black background with 1-4 flat-coloured objects. It is described by a
:class:`SceneSpec` (the objects, in resolution-independent coordinates, plus the caption's category
and the claim the caption makes) and rendered with Pillow at 4x resolution and box-downsampled, so
edges are anti-aliased with exact area coverage.

Vocabulary (fixed, importable): ``SHAPES``, ``COLOURS``, ``SIZES``, ``RELATIONS``; caption
categories (after GenEval) in ``CATEGORIES``:

=================  ===============================================  ======================================
category           caption template (examples)                      scene
=================  ===============================================  ======================================
``single_object``  "a circle"                                       one object, any colour
``two_object``     "a circle and a square"                          two objects of different shapes
``counting``       "three red circles" (two/three/four)             exactly N identical-looking objects
``colors``         "a red circle"                                   one object
``position``       "a blue square to the left of a green circle",   group A is clearly left of / right of /
                   "two red circles above a blue square"            above / below group B (1-2 objects each)
``color_attr``     "a red square and a green triangle"              two objects, different shapes and colours
=================  ===============================================  ======================================

Semantics of a claim (what ShapesEval checks): "a X" means at least one X (as in GenEval), a numeral
("two X") means exactly that many; a colour word restricts the match to that colour; a relation must
hold between the named groups.

Coordinates in specs are fractions of the image side (x to the right, y downwards), so one spec can be
rendered at any resolution with :func:`render_spec`. Sizes are chosen so that at the default 32x32 an
object's radius (half its bounding-box side) is 4-8 px, with at least 3 px between objects.

Deterministic: scene ``i`` of a dataset with seed ``s`` is drawn from ``numpy.random.default_rng([s, i])``,
so it does not depend on the dataset size, the platform or what was generated before.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from starflow.data.shapes_specs import (  # noqa: F401  (moved; names kept importable here)
    BACKGROUND, CATEGORIES, COLOURS, Claim, MARGIN_PX, MIN_GAP_PX, NUMBER_WORDS, ObjectSpec, PALETTE, PLURALS,
    REFERENCE_SIZE, RELATIONS, Requirement, SHAPES, SIZES, SIZE_RADII_PX, SceneSpec, _px, caption_from_claim,
)

SUPERSAMPLE = 4

TRAIN_SEED = 20250601
TEST_SEED = 20250602
SPLIT_SEEDS: dict[str, int] = {"train": TRAIN_SEED, "test": TEST_SEED}

# Sampling
# ----------------------------------------------------------------------------------------------


def _sample_radius(rng: np.random.Generator, size: str) -> float:
    lo, hi = SIZE_RADII_PX[size]
    return _px(float(rng.uniform(lo, hi)))


def relation_holds_clearly(rel: str, ca, ra, cb, rb, gap: float = _px(MIN_GAP_PX)):
    """The generator's strict notion of "A <rel> B" (centres ``ca``/``cb``, radii ``ra``/``rb``): A's box
    lies beyond B's box along the relation axis with ``gap`` free space between them, and the offset is
    within ~27 degrees of that axis (along >= 2 |across|). Works elementwise on numpy arrays."""
    ca, cb = np.asarray(ca, dtype=float), np.asarray(cb, dtype=float)
    dx, dy = cb[..., 0] - ca[..., 0], cb[..., 1] - ca[..., 1]  # offset from A to B
    if rel == "left of":
        along, across = dx, dy
    elif rel == "right of":
        along, across = -dx, dy
    elif rel == "above":
        along, across = dy, dx
    elif rel == "below":
        along, across = -dy, dx
    else:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    return (along >= ra + rb + gap) & (along >= 2.0 * np.abs(across))


def _place(rng, radii, groups=None, relation=None, candidates=64, restarts=40):
    """Place objects of the given radii one by one: draw ``candidates`` uniform centres inside the
    margins and keep the first whose box is >= MIN_GAP_PX from every placed box (and, for a relation
    scene, which is in ``relation`` with every placed object of the other group). Restart on dead ends."""
    gap, margin = _px(MIN_GAP_PX), _px(MARGIN_PX)
    for _ in range(restarts):
        placed: list[tuple[np.ndarray, float]] = []
        for i, r in enumerate(radii):
            lo, hi = margin + r, 1.0 - margin - r
            c = rng.uniform(lo, hi, size=(candidates, 2))
            ok = np.ones(candidates, bool)
            for j, (pc, pr) in enumerate(placed):
                d = np.abs(c - pc)
                ok &= (d[:, 0] >= r + pr + gap) | (d[:, 1] >= r + pr + gap)
                if relation is not None and groups[j] != groups[i]:
                    if groups[j] == 0:  # placed object is in group A, the new one in group B
                        ok &= relation_holds_clearly(relation, pc, pr, c, r, gap)
                    else:
                        ok &= relation_holds_clearly(relation, c, r, pc, pr, gap)
            idx = np.flatnonzero(ok)
            if idx.size == 0:
                break
            placed.append((c[idx[0]], r))
        if len(placed) == len(radii):
            return [((float(c[0]), float(c[1])), r) for c, r in placed]
    return None


def _sizes_for(n_objects: int, rng) -> list[str]:
    allowed = {1: SIZES, 2: ("small", "medium")}.get(n_objects, ("small",))
    return [str(rng.choice(allowed)) for _ in range(n_objects)]


def _distinct(rng, vocab, k):
    return [str(v) for v in rng.choice(np.array(vocab), size=k, replace=False)]


def sample_spec(rng: np.random.Generator, category: str, max_attempts: int = 50) -> SceneSpec:
    """Draw one scene of ``category`` (one of ``CATEGORIES``) from ``rng``."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    if not isinstance(rng, np.random.Generator):
        raise TypeError("rng must be a numpy.random.Generator (e.g. numpy.random.default_rng(seed))")
    for _ in range(max_attempts):
        spec = _try_sample(rng, category)
        if spec is not None:
            return spec
    raise RuntimeError(f"could not place a {category} scene in {max_attempts} attempts")  # pragma: no cover


def _try_sample(rng, category):
    relation = None
    if category in ("single_object", "colors"):
        shapes, colours = [str(rng.choice(SHAPES))], [str(rng.choice(COLOURS))]
        if category == "single_object":
            claim = Claim(category, (Requirement(shapes[0]),))
        else:
            claim = Claim(category, (Requirement(shapes[0], colours[0]),))
        groups = [0]
    elif category in ("two_object", "color_attr"):
        shapes = _distinct(rng, SHAPES, 2)
        colours = _distinct(rng, COLOURS, 2) if category == "color_attr" else [str(c) for c in rng.choice(COLOURS, 2)]
        use_colour = category == "color_attr"
        claim = Claim(category, tuple(Requirement(s, c if use_colour else None) for s, c in zip(shapes, colours)))
        groups = [0, 1]
    elif category == "counting":
        n = int(rng.integers(2, 5))
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOURS))
        shapes, colours = [shape] * n, [colour] * n
        claim = Claim(category, (Requirement(shape, colour, n, exact=True),))
        groups = [0] * n
    elif category == "position":
        relation = str(rng.choice(RELATIONS))
        na, nb = [(1, 1), (2, 1), (1, 2)][int(rng.choice(3, p=[0.7, 0.15, 0.15]))]
        while True:
            (sa, sb), (ca, cb) = [str(s) for s in rng.choice(SHAPES, 2)], [str(c) for c in rng.choice(COLOURS, 2)]
            if (sa, ca) != (sb, cb):
                break
        shapes, colours = [sa] * na + [sb] * nb, [ca] * na + [cb] * nb
        claim = Claim(
            category,
            (Requirement(sa, ca, na, exact=na > 1), Requirement(sb, cb, nb, exact=nb > 1)),
            relation,
        )
        groups = [0] * na + [1] * nb
    else:  # pragma: no cover - guarded by sample_spec
        raise ValueError(category)

    sizes = _sizes_for(len(shapes), rng)
    radii = [_sample_radius(rng, s) for s in sizes]

    placed = _place(rng, radii, groups, relation)
    if placed is None:
        return None
    objects = tuple(
        ObjectSpec(shape=s, colour=c, size=z, centre=(round(p[0], 6), round(p[1], 6)), radius=round(r, 6))
        for s, c, z, (p, r) in zip(shapes, colours, sizes, placed)
    )
    return SceneSpec(objects=objects, claim=claim)


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


def _shape_points(shape: str, cx: float, cy: float, r: float):
    """Polygon vertices in Pillow's pixel-centre coordinates, moved inwards by half a (supersampled)
    pixel: Pillow fills every pixel the outline touches, which would otherwise grow the shape by one
    pixel. Measured: area and centre then match the continuous shape within 2% / 0.1 px."""
    if shape == "square":
        rr = r - 0.5
        return [(cx - rr, cy - rr), (cx + rr, cy - rr), (cx + rr, cy + rr), (cx - rr, cy + rr)]
    if shape == "triangle":
        rho = 2.0 * r / (1.0 + 5.0 ** 0.5)  # inradius of the triangle (apex top centre, base 2r at the bottom)
        ix, iy, k = cx, cy + r - rho, (rho - 0.5) / rho
        return [(ix + (x - ix) * k, iy + (y - iy) * k) for x, y in ((cx, cy - r), (cx + r, cy + r), (cx - r, cy + r))]
    raise ValueError(shape)


def render_spec(spec: SceneSpec, image_size: int = REFERENCE_SIZE) -> np.ndarray:
    """Render a scene as a uint8 array [H, W, 3] (H = W = image_size). Objects are drawn in order
    (later ones on top) at 4x resolution and box-downsampled (exact area anti-aliasing)."""
    if isinstance(spec, ObjectSpec):
        raise TypeError("render_spec takes a SceneSpec; wrap objects with SceneSpec(objects, claim)")
    if not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    s = int(image_size) * SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for obj in spec.objects:
        cx, cy, r = obj.centre[0] * s, obj.centre[1] * s, obj.radius * s
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            # measured: this box convention gives an unbiased centre and area for fractional coordinates
            draw.ellipse([cx - r + 0.5, cy - r + 0.5, cx + r - 0.5, cy + r - 0.5], fill=colour)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=colour)
    img = img.reduce(SUPERSAMPLE)
    return np.asarray(img, dtype=np.uint8).copy()


# ----------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------


class ShapesDataset(Dataset):
    """Captioned shapes scenes. Item ``i`` is ``(uint8 tensor [3, H, W], caption str)``.

    Categories cycle over ``categories`` (default all of ``CATEGORIES``) so every prefix is balanced.
    ``split`` picks the seed (``TRAIN_SEED`` or ``TEST_SEED``) unless ``seed`` is given. Specs are drawn
    at construction (``.specs``); images are rendered on first access and cached (``cache=True``).
    """

    def __init__(
        self,
        split: str = "train",
        size: int = 10_000,
        image_size: int = REFERENCE_SIZE,
        seed: int | None = None,
        categories=None,
        cache: bool = True,
    ):
        if split not in SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(SPLIT_SEEDS)}")
        if not isinstance(size, (int, np.integer)) or size < 0:
            raise ValueError(f"size must be a non-negative integer, got {size!r}")
        if not isinstance(image_size, (int, np.integer)) or image_size < 16:
            raise ValueError(f"image_size must be an integer >= 16, got {image_size!r}")
        cats = tuple(CATEGORIES if categories is None else categories)
        if not cats:
            raise ValueError("categories must not be empty")
        for c in cats:
            if c not in CATEGORIES:
                raise ValueError(f"unknown category {c!r}; expected one of {CATEGORIES}")
        self.split, self.size, self.image_size = split, int(size), int(image_size)
        self.seed = SPLIT_SEEDS[split] if seed is None else int(seed)
        self.categories = cats
        self.specs: list[SceneSpec] = [self.spec_at(i) for i in range(self.size)]
        self.cache = cache
        self._images = np.zeros((self.size, 3, self.image_size, self.image_size), np.uint8) if cache else None
        self._done = np.zeros(self.size, bool) if cache else None

    def spec_at(self, i: int) -> SceneSpec:
        rng = np.random.default_rng([self.seed, int(i)])
        return sample_spec(rng, self.categories[int(i) % len(self.categories)])

    @property
    def captions(self) -> list[str]:
        return [s.caption for s in self.specs]

    def __len__(self) -> int:
        return self.size

    def _render(self, i: int) -> np.ndarray:
        return render_spec(self.specs[i], self.image_size).transpose(2, 0, 1)

    def __getitem__(self, i):
        if not -self.size <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} scenes")
        i = int(i) % self.size
        if self.cache:
            if not self._done[i]:
                self._images[i] = self._render(i)
                self._done[i] = True
            img = self._images[i]
        else:
            img = self._render(i)
        return torch.from_numpy(np.ascontiguousarray(img)).clone(), self.specs[i].caption

    def images(self) -> torch.Tensor:
        """All images as one uint8 tensor [N, 3, H, W]."""
        return torch.stack([self[i][0] for i in range(self.size)]) if self.size else torch.zeros(
            (0, 3, self.image_size, self.image_size), dtype=torch.uint8)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)


__all__ = [
    "SHAPES", "COLOURS", "SIZES", "RELATIONS", "CATEGORIES", "PALETTE", "BACKGROUND", "NUMBER_WORDS",
    "TRAIN_SEED", "TEST_SEED", "ObjectSpec", "Requirement", "Claim", "SceneSpec", "caption_from_claim",
    "sample_spec", "render_spec", "relation_holds_clearly", "ShapesDataset",
]
