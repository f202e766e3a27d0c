"""ShapesEval: a GenEval-style automatic scorer for images of the captioned "shapes" world.

It reads only the generated image and the prompt's structured claim (a :class:`~starflow.data.shapes.SceneSpec`,
a :class:`~starflow.data.shapes.Claim`, or a template prompt string parsed by :func:`spec_from_prompt`):

1. **Colour segmentation.** Each pixel gets the palette colour with the nearest hue (HSV hue; pixels more
   than ``HUE_TOLERANCE`` degrees from every palette hue belong to none) and a membership
   ``chroma / palette chroma`` in [0, 1]. Blending with the black background changes brightness and
   chroma but not hue, so anti-aliased, blurred or dimmed objects keep their colour.
2. **Objects** are the 8-connected components of ``membership >= DETECT_THRESHOLD`` per colour whose
   soft area is at least ``MIN_AREA_PX`` (at 32x32; scaled with the image area) and whose typical
   membership reaches ``MIN_PEAK``.
3. **Shape** by template fitting: for each shape, the template of the same soft area and centroid is
   rasterised (4x4 supersampling) and compared with the component's membership (soft IoU); the best
   template wins if its IoU is at least ``MIN_SHAPE_IOU``, otherwise the object is ``"unknown"``.
4. **Claim check** (:func:`check_claim`), as in GenEval: "a X" needs at least one matching object, a
   numeral needs exactly that many, a colour word restricts the match, and a relation needs the named
   groups to satisfy it pairwise, where "A left of B" means the offset from A's centre to B's centre
   points within 60 degrees of +x (likewise for right of / above / below).

The same :func:`check_claim` applied to a spec's true objects says whether a scene satisfies its caption,
which is how :func:`corrupt_spec` makes scenes that provably violate it (to measure rejection).
"""
from __future__ import annotations

import itertools
import re

import numpy as np

from starflow.data.shapes import (
    CATEGORIES, COLOURS, MIN_GAP_PX, MARGIN_PX, NUMBER_WORDS, RELATIONS, SHAPES, Claim, ObjectSpec,
    Requirement, SceneSpec, _px,
)
from starflow.evaluation.shapes_detect import (  # noqa: F401  (moved; names kept importable here)
    DETECT_THRESHOLD, Detection, HUE_TOLERANCE, MIN_AREA_PX, MIN_PEAK, MIN_SHAPE_IOU, PALETTE_CHROMA,
    PALETTE_HUES, TEMPLATE_BLURS, TEMPLATE_SUPERSAMPLE, as_float_image, colour_membership, detect_objects,
)

RELATION_COS = 0.5  # cos(60 degrees)


def as_claim(spec) -> Claim:
    """A SceneSpec's claim, a Claim itself, or a template prompt parsed with :func:`spec_from_prompt`."""
    if isinstance(spec, SceneSpec):
        return spec.claim
    if isinstance(spec, Claim):
        return spec
    if isinstance(spec, str):
        return spec_from_prompt(spec)
    raise TypeError(f"expected a SceneSpec, Claim or prompt string, got {type(spec).__name__}")


# ----------------------------------------------------------------------------------------------
# Claim checking
# ----------------------------------------------------------------------------------------------


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], cos_min: float = RELATION_COS) -> bool:
    """Lenient check that an object centred at ``a`` is ``rel`` an object centred at ``b`` (y down)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    norm = float(np.hypot(dx, dy))
    if norm < 1e-9:
        return False
    axis = {"left of": (1.0, 0.0), "right of": (-1.0, 0.0), "above": (0.0, 1.0), "below": (0.0, -1.0)}
    if rel not in axis:
        raise ValueError(f"unknown relation {rel!r}; expected one of {RELATIONS}")
    ux, uy = axis[rel]
    return (dx * ux + dy * uy) / norm >= cos_min


def check_claim(objects, claim: Claim) -> tuple[bool, dict]:
    """Does a set of objects satisfy a claim? ``objects``: items with ``.shape``, ``.colour`` and
    ``.centre`` (Detections, or a spec's ObjectSpecs; coordinates in any one consistent unit)."""
    objects = list(objects)
    matches = [[o for o in objects if req.matches(o.shape, o.colour)] for req in claim.items]
    items = []
    ok = True
    for req, found in zip(claim.items, matches):
        good = len(found) == req.count if req.exact else len(found) >= req.count
        ok &= good
        items.append({"shape": req.shape, "colour": req.colour, "needed": req.count,
                      "exact": req.exact, "found": len(found), "ok": bool(good)})
    details: dict = {"items": items}
    if claim.relation is not None:
        rel_ok = False
        if ok:
            (ra, rb), (ma, mb) = claim.items, matches
            for ga in itertools.combinations(range(len(ma)), ra.count):
                for gb in itertools.combinations(range(len(mb)), rb.count):
                    A, B = [ma[i] for i in ga], [mb[j] for j in gb]
                    if any(a is b for a in A for b in B):
                        continue
                    if all(relation_holds(claim.relation, a.centre, b.centre) for a in A for b in B):
                        rel_ok = True
                        break
                if rel_ok:
                    break
        details["relation"] = {"relation": claim.relation, "ok": rel_ok}
        ok &= rel_ok
    return bool(ok), details


def score(image, spec) -> dict:
    """Score one image against a prompt's claim. Returns ``{"category", "passed", "details"}`` where
    details holds the detections and the per-item / relation checks."""
    claim = as_claim(spec)
    dets = detect_objects(image)
    passed, details = check_claim(dets, claim)
    details["detections"] = [d.as_dict() for d in dets]
    details["caption"] = claim.caption
    return {"category": claim.category, "passed": passed, "details": details}


def _iter_images(images):
    if hasattr(images, "detach") and hasattr(images, "cpu"):
        images = images.detach().cpu().numpy()
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"a batch of images must be 4-D [N,H,W,3] or [N,3,H,W], got {tuple(images.shape)}")
        return list(images)
    return list(images)


def evaluate(images, specs) -> dict:
    """Score a batch and tabulate it like GenEval: per category ``{"n", "passed", "accuracy"}``, and
    ``overall`` = mean of the category accuracies (GenEval's overall score); ``overall_micro`` = fraction
    of all images passed. ``results`` keeps every per-image score."""
    images, specs = _iter_images(images), list(specs)
    if len(images) != len(specs):
        raise ValueError(f"got {len(images)} images but {len(specs)} specs")
    results = [score(img, sp) for img, sp in zip(images, specs)]
    return tabulate(results)


def tabulate(results) -> dict:
    """Per-category table from a list of :func:`score` outputs."""
    cats: dict = {}
    for c in CATEGORIES:
        rs = [r for r in results if r["category"] == c]
        if rs:
            p = sum(bool(r["passed"]) for r in rs)
            cats[c] = {"n": len(rs), "passed": p, "accuracy": p / len(rs)}
    n = len(results)
    return {
        "categories": cats,
        "overall": float(np.mean([v["accuracy"] for v in cats.values()])) if cats else float("nan"),
        "overall_micro": sum(bool(r["passed"]) for r in results) / n if n else float("nan"),
        "n": n,
        "results": results,
    }


REASONS = ("missing", "colour", "count", "relation")


def failure_reasons(table: dict) -> dict:
    """Why images failed, per category: ``{category: {reason: n}}`` over the failed images of a
    :func:`tabulate` table, each counted once under the first reason that applies, in this order:
    ``missing`` (a required shape is absent in every colour), ``colour`` (the shape is there but not in the
    required colour: for two-object prompts, a binding error), ``count`` (the right objects in the wrong
    number), ``relation`` (every object right, their relation wrong)."""
    out: dict = {}
    for r in table["results"]:
        if r["passed"]:
            continue
        d = r["details"]
        shapes = {det["shape"] for det in d.get("detections", [])}
        bad = [it for it in d["items"] if not it["ok"]]
        if any(it["shape"] not in shapes for it in bad):
            why = "missing"
        elif any(it["found"] == 0 for it in bad):
            why = "colour"
        elif bad:
            why = "count"
        else:
            why = "relation"
        counts = out.setdefault(r["category"], dict.fromkeys(REASONS, 0))
        counts[why] += 1
    return out


def format_table(table: dict, title: str | None = None) -> str:
    lines = [title] if title else []
    lines.append(f"{'category':<15}{'n':>6}{'accuracy':>10}")
    for c, v in table["categories"].items():
        lines.append(f"{c:<15}{v['n']:>6}{v['accuracy']:>10.3f}")
    lines.append(f"{'overall':<15}{table['n']:>6}{table['overall']:>10.3f}   (mean of categories; "
                 f"micro {table['overall_micro']:.3f})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Prompt parsing
# ----------------------------------------------------------------------------------------------

_PREFIXES = ("a photo of ", "an image of ", "a picture of ", "a drawing of ", "an illustration of ")
_REL_PATTERNS = [
    (r"\b(?:to the left of|on the left of|left of)\b", "left of"),
    (r"\b(?:to the right of|on the right of|right of)\b", "right of"),
    (r"\b(?:above|over|on top of)\b", "above"),
    (r"\b(?:below|under|beneath|underneath)\b", "below"),
]
_NUMBERS = {w: n for n, w in NUMBER_WORDS.items()}
_NUMBERS.update({str(n): n for n in NUMBER_WORDS})
_SINGULAR = {s: s for s in SHAPES}
_SINGULAR.update({s + "s": s for s in SHAPES})
_COLOUR_SYNONYMS = {c: c for c in COLOURS}

GRAMMAR = (
    "prompt := phrase ( 'and' phrase )* | phrase RELATION phrase;  phrase := ('a'|'an'|NUMBER) [COLOUR] SHAPE[s]; "
    f"NUMBER in {list(NUMBER_WORDS.values())}; COLOUR in {list(COLOURS)}; SHAPE in {list(SHAPES)}; "
    "RELATION in ['to the left of', 'to the right of', 'above', 'below']"
)


def _parse_phrase(text: str, prompt: str) -> Requirement:
    words = text.split()
    if len(words) < 2:
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}; grammar: {GRAMMAR}")
    det, rest = words[0], words[1:]
    if det in ("a", "an"):
        count, exact = 1, False
    elif det in _NUMBERS:
        count, exact = _NUMBERS[det], True
    else:
        raise ValueError(f"expected 'a' or a number at {det!r} in prompt {prompt!r}; grammar: {GRAMMAR}")
    colour = None
    if len(rest) == 2:
        if rest[0] not in _COLOUR_SYNONYMS:
            raise ValueError(f"unknown colour {rest[0]!r} in prompt {prompt!r}; colours: {list(COLOURS)}")
        colour = _COLOUR_SYNONYMS[rest[0]]
        rest = rest[1:]
    if len(rest) != 1:
        raise ValueError(f"cannot parse {text!r} in prompt {prompt!r}; grammar: {GRAMMAR}")
    if rest[0] not in _SINGULAR:
        raise ValueError(f"unknown shape {rest[0]!r} in prompt {prompt!r}; shapes: {list(SHAPES)}")
    return Requirement(_SINGULAR[rest[0]], colour, count, exact)


def spec_from_prompt(prompt: str) -> Claim:
    """Parse a prompt in the caption grammar (``GRAMMAR``) into a checkable :class:`Claim`.

    Category: a relation -> ``position``; otherwise any numeral -> ``counting``; one phrase -> ``colors``
    if it names a colour, else ``single_object``; several phrases -> ``color_attr`` if any names a colour,
    else ``two_object``. Round-trips every caption :func:`~starflow.data.shapes.sample_spec` makes.
    """
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = re.sub(r"[^a-z0-9 ]+", " ", prompt.lower())
    text = " ".join(text.split())
    if not text:
        raise ValueError("empty prompt")
    for p in _PREFIXES:
        if text.startswith(p):
            text = text[len(p):]
            break
    for pattern, rel in _REL_PATTERNS:
        parts = re.split(pattern, text)
        if len(parts) == 2:
            a, b = (_parse_phrase(p.strip(), prompt) for p in parts)
            return Claim("position", (a, b), rel)
        if len(parts) > 2:
            raise ValueError(f"more than one relation in prompt {prompt!r}; grammar: {GRAMMAR}")
    items = tuple(_parse_phrase(p.strip(), prompt) for p in re.split(r"\band\b", text))
    if any(r.exact for r in items):
        cat = "counting"
    elif len(items) == 1:
        cat = "colors" if items[0].colour else "single_object"
    else:
        cat = "color_attr" if any(r.colour for r in items) else "two_object"
    return Claim(cat, items)


# ----------------------------------------------------------------------------------------------
# Validation helpers: corrupted scenes and degraded images
# ----------------------------------------------------------------------------------------------

#: Which corruptions make sense for which category (each yields a scene that violates the caption).
CORRUPTIONS: dict[str, tuple[str, ...]] = {
    "single_object": ("shape", "count"),
    "two_object": ("shape", "count"),
    "counting": ("count", "colour", "shape"),
    "colors": ("colour", "shape"),
    "position": ("position", "colour", "count"),
    "color_attr": ("binding", "colour", "shape"),
}


def spec_satisfies_claim(spec: SceneSpec) -> bool:
    """Whether the spec's true objects satisfy its own caption (ground truth for the scorer)."""
    return check_claim(spec.objects, spec.claim)[0]


def _free_centre(rng, objects, r, tries=400):
    gap, margin = _px(MIN_GAP_PX), _px(MARGIN_PX)
    for _ in range(tries):
        c = rng.uniform(margin + r, 1 - margin - r, size=2)
        if all(abs(c[0] - o.centre[0]) >= r + o.radius + gap or abs(c[1] - o.centre[1]) >= r + o.radius + gap
               for o in objects):
            return (float(c[0]), float(c[1]))
    return None


def _claimed(spec: SceneSpec) -> list[int]:
    """Indices of objects that match some item of the claim."""
    return [i for i, o in enumerate(spec.objects) if any(r.matches(o.shape, o.colour) for r in spec.claim.items)]


def corrupt_spec(spec: SceneSpec, kind: str, rng: np.random.Generator) -> SceneSpec:
    """A copy of ``spec`` (same caption) whose objects violate the caption in one way:

    * ``colour``: one claimed object gets another colour; ``shape``: one claimed object gets another shape;
    * ``count``: one object removed (counting: or one identical object added where there is room);
    * ``position``: the scene mirrored across the relation's axis (the groups swap sides);
    * ``binding``: two objects swap colours (colour attribution).
    Raises ValueError if ``kind`` cannot apply to this scene.
    """
    claim, objs = spec.claim, list(spec.objects)
    if kind not in ("colour", "shape", "count", "position", "binding"):
        raise ValueError(f"unknown corruption {kind!r}")
    for _ in range(20):
        new = list(objs)
        idx = _claimed(spec) or list(range(len(objs)))
        if kind == "colour":
            i = int(rng.choice(idx))
            others = [c for c in COLOURS if c != objs[i].colour]
            new[i] = _with(objs[i], colour=str(rng.choice(others)))
        elif kind == "shape":
            i = int(rng.choice(idx))
            others = [s for s in SHAPES if s != objs[i].shape]
            new[i] = _with(objs[i], shape=str(rng.choice(others)))
        elif kind == "count":
            add = claim.category == "counting" and rng.random() < 0.5
            centre = _free_centre(rng, objs, objs[0].radius) if add else None
            if centre is not None:
                new.append(_with(objs[0], centre=centre))
            else:
                del new[int(rng.choice(idx))]
        elif kind == "position":
            if claim.relation is None:
                raise ValueError("position corruption needs a relation claim")
            axis = 0 if claim.relation in ("left of", "right of") else 1
            new = [_with(o, centre=tuple(1.0 - v if a == axis else v for a, v in enumerate(o.centre))) for o in objs]
        elif kind == "binding":
            if len(objs) != 2 or objs[0].colour == objs[1].colour:
                raise ValueError("binding corruption needs two objects of different colours")
            new = [_with(objs[0], colour=objs[1].colour), _with(objs[1], colour=objs[0].colour)]
        out = spec.with_objects(new)
        if not spec_satisfies_claim(out):
            return out
    raise ValueError(f"could not make a {kind!r} corruption of {spec.caption!r} that violates it")


def _with(o: ObjectSpec, **kw) -> ObjectSpec:
    from dataclasses import replace

    return replace(o, **kw)


def degrade(image: np.ndarray, blur_sigma: float = 0.0, noise_std: float = 0.0, rng=None) -> np.ndarray:
    """Gaussian blur (sigma in px) and additive Gaussian noise (std as a fraction of 255) of a uint8
    [H, W, 3] image, returned as uint8: a stand-in for a generative model's imperfect samples."""
    from scipy import ndimage

    x = np.asarray(image, dtype=np.float64)
    if blur_sigma > 0:
        x = ndimage.gaussian_filter(x, sigma=(blur_sigma, blur_sigma, 0), mode="nearest")
    if noise_std > 0:
        rng = np.random.default_rng(0) if rng is None else rng
        x = x + rng.normal(0.0, noise_std * 255.0, size=x.shape)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


__all__ = [
    "score", "evaluate", "tabulate", "format_table", "detect_objects", "check_claim", "spec_from_prompt",
    "relation_holds", "corrupt_spec", "spec_satisfies_claim", "degrade", "as_claim", "as_float_image",
    "Detection", "CORRUPTIONS", "GRAMMAR",
]
