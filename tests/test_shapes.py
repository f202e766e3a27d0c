"""Captioned shapes dataset and the ShapesEval scorer."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from starflow.data.shapes import (
    CATEGORIES,
    COLOURS,
    PALETTE,
    RELATIONS,
    SHAPES,
    TEST_SEED,
    TRAIN_SEED,
    Claim,
    ObjectSpec,
    Requirement,
    SceneSpec,
    ShapesDataset,
    caption_from_claim,
    relation_holds_clearly,
    render_spec,
    sample_spec,
)
from starflow.evaluation.shapes_eval import (
    CORRUPTIONS,
    check_claim,
    corrupt_spec,
    degrade,
    detect_objects,
    evaluate,
    failure_reasons,
    format_table,
    score,
    spec_from_prompt,
    spec_satisfies_claim,
    tabulate,
)

PER_CATEGORY = 200


@pytest.fixture(scope="module")
def test_specs():
    """PER_CATEGORY scenes per category from the test split."""
    ds = ShapesDataset("test", size=PER_CATEGORY * len(CATEGORIES))
    return ds.specs


def _by_category(specs, n):
    out = {c: [] for c in CATEGORIES}
    for s in specs:
        if len(out[s.category]) < n:
            out[s.category].append(s)
    return out


def _one(shape, colour, centre=(0.5, 0.5), radius=0.2, size="medium"):
    return ObjectSpec(shape, colour, size, centre, radius)


# ------------------------------------------------------------------------------------------------
# dataset
# ------------------------------------------------------------------------------------------------


def test_vocabulary_is_fixed_and_colours_are_distinct():
    assert SHAPES == ("circle", "square", "triangle")
    assert COLOURS == ("red", "green", "blue", "yellow")
    assert set(CATEGORIES) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
    assert set(PALETTE) == set(COLOURS)
    from starflow.evaluation.shapes_eval import PALETTE_HUES

    h = np.asarray(PALETTE_HUES)
    d = np.abs(h[:, None] - h[None, :])
    d = np.minimum(d, 360 - d)[~np.eye(len(h), dtype=bool)]
    assert d.min() > 50  # hues at least 50 degrees apart


def test_dataset_is_deterministic_and_seed_dependent():
    a = ShapesDataset("train", size=36)
    b = ShapesDataset("train", size=36)
    c = ShapesDataset("train", size=36, seed=TRAIN_SEED + 1)
    t = ShapesDataset("test", size=36)
    assert a.seed == TRAIN_SEED and t.seed == TEST_SEED
    ia, ib, ic, it = a.images(), b.images(), c.images(), t.images()
    assert ia.numpy().tobytes() == ib.numpy().tobytes()
    assert a.captions == b.captions and a.specs == b.specs
    assert ia.numpy().tobytes() != ic.numpy().tobytes()
    assert ia.numpy().tobytes() != it.numpy().tobytes()
    # scene i does not depend on the dataset size, and uncached rendering gives the same bytes
    small = ShapesDataset("train", size=12, cache=False)
    assert torch.equal(small.images(), ia[:12])
    # different images within one dataset
    assert len({bytes(x.numpy().tobytes()) for x in ia}) == len(ia)


def test_dataset_items_and_sizes():
    ds = ShapesDataset("test", size=24)
    img, cap = ds[5]
    assert img.dtype == torch.uint8 and tuple(img.shape) == (3, 32, 32) and isinstance(cap, str)
    assert cap == ds.specs[5].caption
    assert torch.equal(ds[-1][0], ds[23][0])
    with pytest.raises(IndexError):
        ds[24]
    assert Counter(s.category for s in ds.specs) == {c: 4 for c in CATEGORIES}
    big = ShapesDataset("test", size=6, image_size=64)
    assert tuple(big[0][0].shape) == (3, 64, 64)
    assert big.specs == ds.specs[:6]  # same scenes, rendered larger
    only = ShapesDataset("train", size=10, categories=["position"])
    assert all(s.category == "position" for s in only.specs)


def test_training_dataset_weights_categories_by_repeating_them():
    from starflow.data.registry import build_dataset
    from starflow.train.config import TrainConfig

    cycle = TrainConfig(dataset="shapes", scene_categories=["colors", "position", "position"]).scene_categories
    ds = build_dataset("shapes", "train", 16, size=9, categories=cycle)
    expected = ShapesDataset("train", size=9, image_size=16, categories=cycle)
    assert [ds.captions[i] for i in ds.labels] == expected.captions and torch.equal(ds.images, expected.images())
    assert Counter(s.category for s in expected.specs) == {"colors": 3, "position": 6}


def test_caption_and_spec_agree(test_specs):
    for spec in test_specs:
        claim = spec.claim
        # parse caption -> the same claim; claim -> the same caption
        assert spec_from_prompt(spec.caption) == claim, spec.caption
        assert caption_from_claim(claim) == spec.caption
        # the scene shows exactly what the caption says and nothing else
        assert spec_satisfies_claim(spec), spec.caption
        assert len(spec.objects) == sum(r.count for r in claim.items)
        for r in claim.items:
            assert sum(r.matches(o.shape, o.colour) for o in spec.objects) == r.count
        assert 1 <= len(spec.objects) <= 4
        for o in spec.objects:
            x0, y0, x1, y1 = o.bbox_px(32)
            assert x0 >= 1 - 1e-6 and y0 >= 1 - 1e-6 and x1 <= 31 + 1e-6 and y1 <= 31 + 1e-6
            assert 4.0 - 1e-6 <= o.radius * 32 <= 8.0 + 1e-6
        for i, p in enumerate(spec.objects):  # >= 3 px between any two boxes
            for q in spec.objects[i + 1:]:
                d = np.abs(np.subtract(p.centre, q.centre)) * 32
                assert max(d - (p.radius + q.radius) * 32) >= 3.0 - 1e-4
        if claim.relation is not None:
            a_objs = [o for o in spec.objects if claim.items[0].matches(o.shape, o.colour)]
            b_objs = [o for o in spec.objects if claim.items[1].matches(o.shape, o.colour)]
            for a in a_objs:
                for b in b_objs:
                    assert relation_holds_clearly(claim.relation, a.centre, a.radius, b.centre, b.radius)
    cats = Counter(s.category for s in test_specs)
    assert all(cats[c] == PER_CATEGORY for c in CATEGORIES)
    relations = Counter(s.claim.relation for s in test_specs if s.category == "position")
    assert set(relations) == set(RELATIONS)
    counts = Counter(s.claim.items[0].count for s in test_specs if s.category == "counting")
    assert set(counts) == {2, 3, 4}


def test_render_geometry_and_antialiasing():
    spec = SceneSpec((_one("square", "blue", (0.5, 0.5), 0.25),), Claim("colors", (Requirement("square", "blue"),)))
    img = render_spec(spec, 32)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert tuple(img[16, 16]) == PALETTE["blue"] and tuple(img[0, 0]) == (0, 0, 0)
    cover = img[..., 2].astype(float) / PALETTE["blue"][2]
    assert abs(cover.sum() - 16 * 16) < 0.05 * 256
    circle = SceneSpec((_one("circle", "red", (0.4, 0.6), 0.2),), Claim("single_object", (Requirement("circle"),)))
    c = render_spec(circle, 32)[..., 0].astype(float) / PALETTE["red"][0]
    assert abs(c.sum() - np.pi * 6.4**2) < 0.03 * np.pi * 6.4**2
    assert ((c > 0.05) & (c < 0.95)).sum() > 10  # anti-aliased rim
    ys, xs = np.mgrid[:32, :32] + 0.5
    assert abs((c * xs).sum() / c.sum() - 12.8) < 0.15 and abs((c * ys).sum() / c.sum() - 19.2) < 0.15


# ------------------------------------------------------------------------------------------------
# prompt parser
# ------------------------------------------------------------------------------------------------


def test_spec_from_prompt_grammar():
    c = spec_from_prompt("two red circles above a blue square")
    assert c == Claim("position", (Requirement("circle", "red", 2, True), Requirement("square", "blue")), "above")
    assert spec_from_prompt("A photo of a red circle.") == Claim("colors", (Requirement("circle", "red"),))
    assert spec_from_prompt("a triangle") == Claim("single_object", (Requirement("triangle"),))
    assert spec_from_prompt("3 blue squares").items == (Requirement("square", "blue", 3, True),)
    assert spec_from_prompt("a circle and a square").category == "two_object"
    assert spec_from_prompt("a red square and a green triangle").category == "color_attr"
    assert spec_from_prompt("a green circle to the right of a yellow triangle").relation == "right of"
    assert spec_from_prompt("a green circle left of a yellow triangle").relation == "left of"
    assert spec_from_prompt("a circle below a square").relation == "below"
    for bad in ["", "   ", "a purple circle", "a red hexagon", "red circle", "many circles",
                "a circle above a square below a triangle", "a big red circle"]:
        with pytest.raises(ValueError):
            spec_from_prompt(bad)
    with pytest.raises(TypeError):
        spec_from_prompt(3)


# ------------------------------------------------------------------------------------------------
# scorer
# ------------------------------------------------------------------------------------------------


def test_scorer_detects_every_shape_colour_at_min_and_max_size():
    for image_size in (32, 64):
        for shape in SHAPES:
            for colour in COLOURS:
                for r_px in (4.0, 8.0):
                    spec = SceneSpec((_one(shape, colour, (0.45, 0.55), r_px / 32),),
                                     Claim("colors", (Requirement(shape, colour),)))
                    dets = detect_objects(render_spec(spec, image_size))
                    assert [(d.shape, d.colour) for d in dets] == [(shape, colour)], (image_size, shape, colour, r_px)
                    cx, cy = dets[0].centre
                    assert abs(cx - 0.45 * image_size) < 0.5 and abs(cy - 0.55 * image_size) < 0.5


def test_scorer_accuracy_on_ground_truth_32(test_specs):
    images = np.stack([render_spec(s, 32) for s in test_specs])
    table = evaluate(images, test_specs)
    for c in CATEGORIES:
        assert table["categories"][c]["n"] == PER_CATEGORY
        assert table["categories"][c]["accuracy"] >= 0.98, format_table(table)
    assert table["overall"] >= 0.98
    text = format_table(table)
    assert "overall" in text and all(c in text for c in CATEGORIES)


def test_scorer_accuracy_on_ground_truth_64(test_specs):
    specs = [s for c, ss in _by_category(test_specs, 30).items() for s in ss]
    table = evaluate([render_spec(s, 64) for s in specs], specs)
    for c in CATEGORIES:
        assert table["categories"][c]["accuracy"] >= 0.98, format_table(table)


def test_scorer_tolerates_mild_blur_and_noise(test_specs):
    rng = np.random.default_rng(0)
    specs = [s for c, ss in _by_category(test_specs, 100).items() for s in ss]
    images = [degrade(render_spec(s, 32), blur_sigma=0.5, noise_std=0.03, rng=rng) for s in specs]
    assert np.abs(images[0].astype(int) - render_spec(specs[0], 32)).max() > 10  # really degraded
    table = evaluate(images, specs)
    for c in CATEGORIES:
        assert table["categories"][c]["accuracy"] >= 0.9, format_table(table)


def test_scorer_rejects_corrupted_scenes(test_specs):
    rng = np.random.default_rng(1)
    rejected, total = Counter(), Counter()
    for cat, specs in _by_category(test_specs, 100).items():
        for spec in specs:
            for kind in CORRUPTIONS[cat]:
                bad = corrupt_spec(spec, kind, rng)
                assert bad.caption == spec.caption and not spec_satisfies_claim(bad)
                total[cat, kind] += 1
                rejected[cat, kind] += not score(render_spec(bad, 32), bad)["passed"]
    rates = {k: rejected[k] / total[k] for k in total}
    assert {k for k, _ in total} == set(CATEGORIES)
    for kind in ("colour", "count", "position", "binding", "shape"):
        assert any(k == kind for _, k in total)
    assert min(rates.values()) >= 0.95, rates


def test_failure_reasons_name_the_corruption(test_specs):
    """A mirrored position scene fails on its relation; swapped colours fail as a colour (binding) error;
    a removed object as a count or a missing shape; passed images are not counted."""
    rng = np.random.default_rng(2)
    by_cat = _by_category(test_specs, 30)
    cases = {("position", "position"): "relation", ("color_attr", "binding"): "colour", ("colors", "shape"): "missing"}
    for (cat, kind), reason in cases.items():
        bad = [corrupt_spec(s, kind, rng) for s in by_cat[cat]]
        table = tabulate([score(render_spec(b, 32), b) for b in bad])
        counts = failure_reasons(table)[cat]
        failed = len(bad) - table["categories"][cat]["passed"]
        assert sum(counts.values()) == failed and counts[reason] >= 0.9 * failed, (cat, kind, counts)
    good = tabulate([score(render_spec(s, 32), s) for s in by_cat["position"][:5]])
    assert failure_reasons(good) == {}


def test_position_and_binding_checks_are_specific():
    """Hand-made scenes: the scorer must tell left from right, above from below, and who has which colour."""
    claim = spec_from_prompt("a blue square to the left of a green circle")
    left = SceneSpec((_one("square", "blue", (0.25, 0.5), 0.15), _one("circle", "green", (0.75, 0.5), 0.15)), claim)
    right = left.with_objects([_one("square", "blue", (0.75, 0.5), 0.15), _one("circle", "green", (0.25, 0.5), 0.15)])
    assert score(render_spec(left), left)["passed"]
    assert not score(render_spec(right), right)["passed"]
    stacked = left.with_objects([_one("square", "blue", (0.5, 0.25), 0.15), _one("circle", "green", (0.5, 0.75), 0.15)])
    assert not score(render_spec(stacked), claim)["passed"]  # above, not left of
    assert score(render_spec(stacked), "a blue square above a green circle")["passed"]
    assert not score(render_spec(stacked), "a blue square below a green circle")["passed"]
    attr = spec_from_prompt("a red square and a green triangle")
    good = SceneSpec((_one("square", "red", (0.3, 0.3), 0.15), _one("triangle", "green", (0.7, 0.7), 0.15)), attr)
    swapped = good.with_objects([_one("square", "green", (0.3, 0.3), 0.15), _one("triangle", "red", (0.7, 0.7), 0.15)])
    assert score(render_spec(good), attr)["passed"] and not score(render_spec(swapped), attr)["passed"]
    # counting is exact
    three = SceneSpec(tuple(_one("circle", "red", (x, 0.5), 0.12) for x in (0.2, 0.5, 0.8)),
                      spec_from_prompt("three red circles"))
    img = render_spec(three)
    assert score(img, "three red circles")["passed"]
    assert not score(img, "two red circles")["passed"] and not score(img, "four red circles")["passed"]
    assert score(img, "a red circle to the left of a red circle")["passed"]  # two distinct objects
    assert not score(img, "a red circle above a red circle")["passed"]
    assert not score(np.zeros((32, 32, 3), np.uint8), "a circle")["passed"]


def test_score_accepts_common_image_formats():
    spec = sample_spec(np.random.default_rng(3), "color_attr")
    hwc = render_spec(spec, 32)
    results = [
        score(hwc, spec),
        score(torch.from_numpy(hwc).permute(2, 0, 1), spec),  # uint8 CHW tensor
        score(hwc.astype(np.float32) / 255.0, spec.claim),  # float HWC in [0,1]
        score(torch.from_numpy(hwc).permute(2, 0, 1).float() / 255.0, spec.caption),  # float CHW tensor, prompt
    ]
    from PIL import Image

    results.append(score(Image.fromarray(hwc), spec))
    for r in results:
        assert set(r) == {"category", "passed", "details"} and r["category"] == "color_attr" and r["passed"]
        assert len(r["details"]["detections"]) == 2
    batch = torch.from_numpy(np.stack([hwc, hwc])).permute(0, 3, 1, 2)
    table = evaluate(batch, [spec, spec])
    assert table["n"] == 2 and table["overall"] == 1.0


def test_bad_inputs_raise_clear_errors():
    spec = sample_spec(np.random.default_rng(0), "colors")
    img = render_spec(spec, 32)
    for bad in [img[..., 0], img[None], np.zeros((32, 32, 4), np.uint8), np.zeros((4, 4, 3), np.uint8),
                img.astype(np.float32) * 2 - 1, np.full((32, 32, 3), np.nan, np.float32)]:
        with pytest.raises(ValueError):
            score(bad, spec)
    with pytest.raises(TypeError):
        score(img, 42)
    with pytest.raises(TypeError):
        score("not an image", spec)
    with pytest.raises(ValueError):
        evaluate([img, img], [spec])
    with pytest.raises(ValueError):
        Claim("reasoning", (Requirement("circle"),))  # unknown category
    with pytest.raises(ValueError):
        sample_spec(np.random.default_rng(0), "reasoning")
    with pytest.raises(ValueError):
        Requirement("hexagon")
    with pytest.raises(ValueError):
        ObjectSpec("circle", "purple", "small", (0.5, 0.5), 0.1)
    with pytest.raises(ValueError):
        ShapesDataset("val", size=4)
    with pytest.raises(ValueError):
        ShapesDataset("train", size=4, image_size=8)
    with pytest.raises(ValueError):
        ShapesDataset("train", size=4, categories=["reasoning"])
    with pytest.raises(ValueError):
        corrupt_spec(spec, "position", np.random.default_rng(0))  # no relation to swap
    with pytest.raises(ValueError):
        check_claim([], Claim("position", (Requirement("circle"), Requirement("square")), "inside"))
