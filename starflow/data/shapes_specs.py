"""The vocabulary of the captioned "shapes" world, its scene specs and their template captions.

A :class:`SceneSpec` holds the objects (resolution-independent coordinates: fractions of the image side,
x to the right, y downwards) and the :class:`Claim` its caption makes; ``caption_from_claim`` writes the
caption. Sampling, rendering and the dataset are in ``starflow.data.shapes``.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow")
SIZES: tuple[str, ...] = ("small", "medium", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

#: RGB of each colour word: saturated, hues ~0/131/227/54 degrees apart so they stay separable under
#: blur, noise and blending with the black background (which changes brightness, not hue).
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (235, 50, 50),
    "green": (40, 200, 70),
    "blue": (50, 90, 235),
    "yellow": (240, 220, 40),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)

PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
NUMBER_WORDS: dict[int, str] = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}

#: Radius ranges in pixels at the 32 px reference resolution (radius = half the bounding-box side).
REFERENCE_SIZE = 32
SIZE_RADII_PX: dict[str, tuple[float, float]] = {"small": (4.0, 5.0), "medium": (5.0, 6.5), "large": (6.5, 8.0)}
MIN_GAP_PX = 3.0  # free space between the bounding boxes of any two objects
MARGIN_PX = 1.0  # free space between an object and the image border

def _px(v: float) -> float:
    return v / REFERENCE_SIZE


# ----------------------------------------------------------------------------------------------
# Specs
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectSpec:
    """One object. ``centre`` = (x, y) and ``radius`` are fractions of the image side; the object
    fills the box ``[cx - r, cx + r] x [cy - r, cy + r]`` (circle: inscribed disc; square: the box;
    triangle: apex at the top centre, base along the bottom edge)."""

    shape: str
    colour: str
    size: str
    centre: tuple[float, float]
    radius: float

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES}")
        if not self.radius > 0:
            raise ValueError(f"radius must be positive, got {self.radius}")

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) as fractions of the image side."""
        cx, cy = self.centre
        r = self.radius
        return (cx - r, cy - r, cx + r, cy + r)

    def bbox_px(self, image_size: int) -> tuple[float, float, float, float]:
        return tuple(v * image_size for v in self.bbox)  # type: ignore[return-value]


@dataclass(frozen=True)
class Requirement:
    """A noun phrase of a caption: ``count`` objects of ``shape`` (of ``colour``, or any colour if None).
    ``exact`` is True for numerals ("two circles": exactly two), False for "a circle" (at least one)."""

    shape: str
    colour: str | None = None
    count: int = 1
    exact: bool = False

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"unknown colour {self.colour!r}; expected one of {COLOURS}")
        if self.count < 1:
            raise ValueError(f"count must be >= 1, got {self.count}")

    def matches(self, shape: str, colour: str) -> bool:
        return shape == self.shape and (self.colour is None or colour == self.colour)


@dataclass(frozen=True)
class Claim:
    """What a caption asserts: its category, its noun phrases and (for ``position``) the relation of
    ``items[0]`` to ``items[1]`` (one of ``RELATIONS``)."""

    category: str
    items: tuple[Requirement, ...]
    relation: str | None = None

    def __post_init__(self):
        if self.category not in CATEGORIES:
            raise ValueError(f"unknown category {self.category!r}; expected one of {CATEGORIES}")
        if not self.items:
            raise ValueError("a claim needs at least one item")
        if self.relation is not None:
            if self.relation not in RELATIONS:
                raise ValueError(f"unknown relation {self.relation!r}; expected one of {RELATIONS}")
            if len(self.items) != 2:
                raise ValueError("a relation needs exactly two items")

    @property
    def caption(self) -> str:
        return caption_from_claim(self)


@dataclass(frozen=True)
class SceneSpec:
    """A scene: its objects, the caption's category and claim, and the caption text."""

    objects: tuple[ObjectSpec, ...]
    claim: Claim
    caption: str = field(default="")

    def __post_init__(self):
        if not self.caption:
            object.__setattr__(self, "caption", caption_from_claim(self.claim))

    @property
    def category(self) -> str:
        return self.claim.category

    def with_objects(self, objects) -> "SceneSpec":
        """Same caption and claim, different objects (for editing / corruption)."""
        return replace(self, objects=tuple(objects))


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------


def _noun_phrase(req: Requirement) -> str:
    words = []
    if req.exact or req.count > 1:
        words.append(NUMBER_WORDS.get(req.count, str(req.count)))
    else:
        words.append("a")
    if req.colour is not None:
        words.append(req.colour)
    words.append(PLURALS[req.shape] if req.count > 1 else req.shape)
    return " ".join(words)


_RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


def caption_from_claim(claim: Claim) -> str:
    """The template caption for a claim (inverse of :func:`starflow.evaluation.shapes_eval.spec_from_prompt`)."""
    if claim.relation is not None:
        a, b = claim.items
        return f"{_noun_phrase(a)} {_RELATION_PHRASES[claim.relation]} {_noun_phrase(b)}"
    return " and ".join(_noun_phrase(r) for r in claim.items)


# ----------------------------------------------------------------------------------------------
