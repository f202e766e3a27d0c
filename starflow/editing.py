"""Instruction editing (DESIGN.md §3 "Applications"): an editing dataset made from shapes scenes, an edit
model that reads the source image as an extra prefix of the deep block, its training, and automatic scoring.

Dataset
-------
An :class:`EditExample` is (source scene, instruction, target scene), consistent by construction: the target
is :func:`apply_instruction` of the source, which changes exactly one object. Instruction types
(``EDIT_KINDS``) and their templates:

=============  ===================================  ===========================================================
kind           instruction                          target
=============  ===================================  ===========================================================
``recolour``   "make the circle blue"               the (only) circle gets the new colour; nothing else changes
``remove``     "remove the square"                  the (only) square is gone (the scene keeps >= 1 object)
``add``        "add a red triangle"                 a new small/medium object in free space (>= 3 px from all)
``move``       "move the triangle to the left"      the (only) triangle shifts by ``MOVE_PX`` (8 px at 32 px)
               ("to the right", "up", "down")       and stays inside the margins and >= 3 px from the others
=============  ===================================  ===========================================================

"the X" needs exactly one X in the source (else the instruction is ambiguous and is not generated). Example
``i`` of a split is drawn from ``numpy.random.default_rng([seed, i])`` with kinds cycling, so every prefix
of the dataset is balanced and nothing depends on the dataset size.

Scoring
-------
:func:`infer_edit` compares the ShapesEval detections of a source image and an edited image (objects matched
by shape, colour and position within ``tol_px``) and names the one change it sees, or ``None`` when the
difference is not exactly one supported edit. :func:`score_edit` says whether an edited image realises an
example's instruction: the inferred change equals the requested one (``change_ok``) and every other object
is still where it was (``rest_ok``).

Edit model
----------
:class:`EditSTARFlow` is STARFlow whose deep block's prefix is ``[source tokens ; instruction tokens]``:
the source image in the model's space (pixels in [-1, 1] or latents) is patchified like the input, projected
to the width and given its own position embedding. Shallow blocks stay unconditional. The instruction is
dropped to the learned null with ``cond_drop_prob`` (classifier-free guidance on the instruction); the source
is never dropped. :meth:`EditSTARFlow.from_base` starts from a trained text-conditional STARFlow (all its
weights; only the source projection is new), which is the paper's fine-tuning recipe.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from starflow.config import FlowConfig
from starflow.data.shapes import (COLOURS, MARGIN_PX, MIN_GAP_PX, REFERENCE_SIZE, SHAPES, SIZE_RADII_PX, Claim,
                                  ObjectSpec, Requirement, SceneSpec, _px, render_spec, sample_spec)
from starflow.flow.block import Context, FlowBlock
from starflow.flow.condition import Condition
from starflow.flow.model import STARFlow
from starflow.pipeline import StarflowPipeline

EDIT_KINDS: tuple[str, ...] = ("recolour", "remove", "add", "move")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_PX = 8.0          # how far "move" shifts an object, px at the 32 px reference size
TOL_PX = 2.5           # position tolerance of the scorer, px at 32 px
EDIT_TRAIN_SEED = 20250611
EDIT_TEST_SEED = 20250612
EDIT_SPLIT_SEEDS = {"train": EDIT_TRAIN_SEED, "test": EDIT_TEST_SEED}
#: source scene categories (from starflow.data.shapes) used for editing; counting scenes (N identical
#: objects) rarely allow "the X" and are left out.
DEFAULT_EDIT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "starflow_edit")
SOURCE_CATEGORIES = ("single_object", "two_object", "colors", "position", "color_attr")


# ---------------------------------------------------------------------------------------------------
# Instructions
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    kind: str
    shape: str
    colour: str | None = None      # recolour: the new colour; add: the new object's colour
    direction: str | None = None   # move

    def __post_init__(self):
        if self.kind not in EDIT_KINDS:
            raise ValueError(f"unknown edit kind {self.kind!r}; expected one of {EDIT_KINDS}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.kind in ("recolour", "add") and self.colour not in COLOURS:
            raise ValueError(f"{self.kind} needs a colour in {COLOURS}, got {self.colour!r}")
        if self.kind == "move" and self.direction not in DIRECTIONS:
            raise ValueError(f"move needs a direction in {tuple(DIRECTIONS)}, got {self.direction!r}")

    @property
    def text(self) -> str:
        if self.kind == "recolour":
            return f"make the {self.shape} {self.colour}"
        if self.kind == "remove":
            return f"remove the {self.shape}"
        if self.kind == "add":
            return f"add a {self.colour} {self.shape}"
        where = {"left": "to the left", "right": "to the right", "up": "up", "down": "down"}[self.direction]
        return f"move the {self.shape} {where}"


_SHAPE_RE = "|".join(SHAPES)
_COLOUR_RE = "|".join(COLOURS)
_PATTERNS = [
    ("recolour", re.compile(rf"^(?:make|colou?r|paint|turn) the ({_SHAPE_RE}) (?:to )?({_COLOUR_RE})$")),
    ("remove", re.compile(rf"^(?:remove|delete) the ({_SHAPE_RE})$")),
    ("add", re.compile(rf"^add an? ({_COLOUR_RE}) ({_SHAPE_RE})$")),
    ("move", re.compile(rf"^move the ({_SHAPE_RE}) (?:to the )?(left|right|up|down)(?: side)?$")),
]
GRAMMAR = ("'make the SHAPE COLOUR' | 'remove the SHAPE' | 'add a COLOUR SHAPE' | "
           "'move the SHAPE to the left|to the right|up|down'; "
           f"SHAPE in {list(SHAPES)}, COLOUR in {list(COLOURS)}")


def parse_instruction(text: str) -> Instruction:
    """Parse an instruction of the grammar in ``GRAMMAR`` (case and surrounding spaces are ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("empty instruction")
    t = " ".join(text.lower().strip().rstrip(".!").split())
    for kind, pat in _PATTERNS:
        m = pat.match(t)
        if not m:
            continue
        a, b = (m.groups() + (None,))[:2]
        if kind == "recolour":
            return Instruction(kind, a, colour=b)
        if kind == "remove":
            return Instruction(kind, a)
        if kind == "add":
            return Instruction(kind, b, colour=a)
        return Instruction(kind, a, direction=b)
    raise ValueError(f"cannot parse instruction {text!r}; grammar: {GRAMMAR}")


# ---------------------------------------------------------------------------------------------------
# Applying an instruction to a scene
# ---------------------------------------------------------------------------------------------------


def describe(objects) -> Claim:
    """A claim that lists every (colour, shape) group of ``objects`` with its count ("two red circles and a
    blue square"); the caption of an edited scene."""
    groups: dict[tuple[str, str], int] = {}
    for o in objects:
        groups[(o.shape, o.colour)] = groups.get((o.shape, o.colour), 0) + 1
    if not groups:
        raise ValueError("a scene needs at least one object")
    items = tuple(Requirement(s, c, n, exact=n > 1) for (s, c), n in groups.items())
    if len(items) == 1:
        category = "counting" if items[0].count > 1 else "colors"
    else:
        category = "color_attr"
    return Claim(category, items)


def _boxes_clear(centre, r, others, gap=_px(MIN_GAP_PX)) -> bool:
    for o in others:
        if abs(centre[0] - o.centre[0]) < r + o.radius + gap and abs(centre[1] - o.centre[1]) < r + o.radius + gap:
            return False
    return True


def _inside(centre, r, margin=_px(MARGIN_PX)) -> bool:
    return all(margin + r <= c <= 1.0 - margin - r for c in centre)


def _the(spec: SceneSpec, shape: str) -> int:
    idx = [i for i, o in enumerate(spec.objects) if o.shape == shape]
    if len(idx) != 1:
        raise ValueError(f"'the {shape}' is ambiguous or absent: the scene has {len(idx)} {shape}s")
    return idx[0]


def apply_instruction(spec: SceneSpec, ins: Instruction, rng: np.random.Generator | None = None,
                      candidates: int = 128) -> tuple[SceneSpec, int]:
    """(target scene, index of the changed object: in the source for recolour/remove/move, in the target for
    add). Raises ValueError if the instruction does not apply (ambiguous, no room, last object, ...).
    ``add`` draws the new object's size and place from ``rng``."""
    objs = list(spec.objects)
    if ins.kind == "add":
        if rng is None:
            raise ValueError("'add' needs an rng to place the new object")
        if len(objs) >= 4:
            raise ValueError("the scene already has 4 objects")
        size = str(rng.choice(("small", "medium")))
        lo, hi = SIZE_RADII_PX[size]
        r = round(_px(float(rng.uniform(lo, hi))), 6)
        margin = _px(MARGIN_PX)
        cs = rng.uniform(margin + r, 1.0 - margin - r, size=(candidates, 2))
        for c in cs:
            c = (round(float(c[0]), 6), round(float(c[1]), 6))
            if _boxes_clear(c, r, objs):
                new = ObjectSpec(ins.shape, ins.colour, size, c, r)
                out = objs + [new]
                return SceneSpec(tuple(out), describe(out)), len(out) - 1
        raise ValueError("no free space for a new object")
    i = _the(spec, ins.shape)
    o = objs[i]
    if ins.kind == "recolour":
        if o.colour == ins.colour:
            raise ValueError(f"the {o.shape} is already {o.colour}")
        objs[i] = ObjectSpec(o.shape, ins.colour, o.size, o.centre, o.radius)
    elif ins.kind == "remove":
        if len(objs) < 2:
            raise ValueError("cannot remove the only object")
        del objs[i]
    else:  # move
        dx, dy = DIRECTIONS[ins.direction]
        step = _px(MOVE_PX)
        c = (round(o.centre[0] + dx * step, 6), round(o.centre[1] + dy * step, 6))
        if not _inside(c, o.radius):
            raise ValueError(f"the {o.shape} would leave the image")
        if not _boxes_clear(c, o.radius, objs[:i] + objs[i + 1:]):
            raise ValueError(f"the {o.shape} would hit another object")
        objs[i] = ObjectSpec(o.shape, o.colour, o.size, c, o.radius)
    return SceneSpec(tuple(objs), describe(objs)), i


@dataclass(frozen=True)
class EditExample:
    source: SceneSpec
    instruction: Instruction
    target: SceneSpec
    index: int  # the changed object (see apply_instruction)

    @property
    def text(self) -> str:
        return self.instruction.text

    @property
    def kind(self) -> str:
        return self.instruction.kind


def _random_instruction(rng, spec: SceneSpec, kind: str) -> Instruction | None:
    counts = {s: sum(o.shape == s for o in spec.objects) for s in SHAPES}
    unique = [s for s in SHAPES if counts[s] == 1]
    if kind == "add":
        return Instruction("add", str(rng.choice(SHAPES)), colour=str(rng.choice(COLOURS)))
    if not unique:
        return None
    shape = str(rng.choice(unique))
    if kind == "recolour":
        old = spec.objects[_the(spec, shape)].colour
        return Instruction("recolour", shape, colour=str(rng.choice([c for c in COLOURS if c != old])))
    if kind == "remove":
        return Instruction("remove", shape)
    return Instruction("move", shape, direction=str(rng.choice(tuple(DIRECTIONS))))


def sample_edit(rng: np.random.Generator, kind: str, max_attempts: int = 200) -> EditExample:
    """Draw one consistent (source, instruction, target) example of ``kind``."""
    if kind not in EDIT_KINDS:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    for _ in range(max_attempts):
        spec = sample_spec(rng, str(rng.choice(SOURCE_CATEGORIES)))
        ins = _random_instruction(rng, spec, kind)
        if ins is None:
            continue
        try:
            target, idx = apply_instruction(spec, ins, rng)
        except ValueError:
            continue
        return EditExample(spec, ins, target, idx)
    raise RuntimeError(f"could not make a {kind} edit in {max_attempts} attempts")  # pragma: no cover


class EditDataset(torch.utils.data.Dataset):
    """Item i: (source uint8 [3, H, W], target uint8 [3, H, W], instruction text). ``examples`` holds the specs."""

    def __init__(self, split: str = "train", size: int = 1000, image_size: int = REFERENCE_SIZE, seed: int | None = None,
                 kinds=EDIT_KINDS):
        if split not in EDIT_SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}; expected one of {sorted(EDIT_SPLIT_SEEDS)}")
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        kinds = tuple(kinds)
        if not kinds or any(k not in EDIT_KINDS for k in kinds):
            raise ValueError(f"kinds must be a non-empty subset of {EDIT_KINDS}, got {kinds}")
        self.split, self.image_size, self.kinds = split, int(image_size), kinds
        self.seed = EDIT_SPLIT_SEEDS[split] if seed is None else int(seed)
        self.examples = [self.example_at(i) for i in range(size)]
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def example_at(self, i: int) -> EditExample:
        return sample_edit(np.random.default_rng([self.seed, int(i)]), self.kinds[int(i) % len(self.kinds)])

    def __len__(self) -> int:
        return len(self.examples)

    def images(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if i not in self._cache:
            ex = self.examples[i]
            self._cache[i] = tuple(torch.from_numpy(render_spec(s, self.image_size).transpose(2, 0, 1).copy())
                                   for s in (ex.source, ex.target))
        return self._cache[i]

    def __getitem__(self, i):
        src, tgt = self.images(int(i))
        return src, tgt, self.examples[int(i)].text

    @property
    def instructions(self) -> list[str]:
        return [e.text for e in self.examples]


# ---------------------------------------------------------------------------------------------------
# Scoring with the ShapesEval detector
# ---------------------------------------------------------------------------------------------------


def _match(a, b, tol: float):
    """Match detections a <-> b of the same shape and colour within ``tol`` px (optimal assignment).
    Returns (pairs, unmatched a indices, unmatched b indices)."""
    from scipy.optimize import linear_sum_assignment

    if not a or not b:
        return [], list(range(len(a))), list(range(len(b)))
    big = 1e6
    cost = np.full((len(a), len(b)), big)
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            if p.shape == q.shape and p.colour == q.colour:
                d = math.hypot(p.centre[0] - q.centre[0], p.centre[1] - q.centre[1])
                if d <= tol:
                    cost[i, j] = d
    rows, cols = linear_sum_assignment(cost)
    pairs = [(i, j) for i, j in zip(rows, cols) if cost[i, j] < big]
    ma, mb = {i for i, _ in pairs}, {j for _, j in pairs}
    return pairs, [i for i in range(len(a)) if i not in ma], [j for j in range(len(b)) if j not in mb]


def infer_edit(source_image, edited_image, tol_px: float = TOL_PX) -> Instruction | None:
    """The single edit that turns the objects detected in ``source_image`` into those detected in
    ``edited_image`` (``tol_px`` at 32 px, scaled with the image size), or None if the difference is not
    exactly one recolour / remove / add / move (or an object is undetectable / of unknown shape)."""
    from starflow.evaluation.shapes_eval import as_float_image, detect_objects

    h = as_float_image(source_image).shape[0]
    scale = h / REFERENCE_SIZE
    src, dst = detect_objects(source_image), detect_objects(edited_image)
    if any(d.shape == "unknown" for d in src + dst):
        return None
    _, ua, ub = _match(src, dst, tol_px * scale)
    A, B = [src[i] for i in ua], [dst[j] for j in ub]
    if len(A) == 1 and not B:
        return Instruction("remove", A[0].shape)
    if len(B) == 1 and not A:
        return Instruction("add", B[0].shape, colour=B[0].colour)
    if len(A) == 1 and len(B) == 1 and A[0].shape == B[0].shape:
        a, b = A[0], B[0]
        dx, dy = (b.centre[0] - a.centre[0]) / scale, (b.centre[1] - a.centre[1]) / scale
        if a.colour != b.colour and math.hypot(dx, dy) <= tol_px:
            return Instruction("recolour", a.shape, colour=b.colour)
        if a.colour == b.colour:
            along, across = (dx, dy) if abs(dx) >= abs(dy) else (dy, dx)
            if abs(along) >= MOVE_PX / 2 and abs(across) <= MOVE_PX / 2:
                direction = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
                return Instruction("move", a.shape, direction=direction)
    return None


def score_edit(source_image, edited_image, instruction, tol_px: float = TOL_PX) -> dict:
    """Did the edit happen? ``passed``: the detected change is exactly ``instruction`` (Instruction or text).
    ``rest_ok``: every source object other than the edited one is still detected unchanged."""
    from starflow.evaluation.shapes_eval import as_float_image, detect_objects

    ins = parse_instruction(instruction) if isinstance(instruction, str) else instruction
    got = infer_edit(source_image, edited_image, tol_px)
    h = as_float_image(source_image).shape[0]
    src, dst = detect_objects(source_image), detect_objects(edited_image)
    keep = [d for d in src if not (ins.kind != "add" and d.shape == ins.shape)]
    _, unmatched, _ = _match(keep, dst, tol_px * h / REFERENCE_SIZE)
    return {"passed": got == ins, "detected": None if got is None else got.text, "rest_ok": not unmatched}


# ---------------------------------------------------------------------------------------------------
# The edit model
# ---------------------------------------------------------------------------------------------------


@dataclass
class EditCondition(Condition):
    """A Condition plus the source image as flow tokens [B, L, D] (kept in the null / guidance branch)."""

    source: torch.Tensor | None = field(default=None)

    def null(self) -> "EditCondition":
        c = super().null()
        return EditCondition(c.labels, c.text, c.text_mask, c.drop, self.source)

    def cat(self, other: "EditCondition") -> "EditCondition":
        c = super().cat(other)
        src = None if self.source is None else torch.cat([self.source, other.source])
        return EditCondition(c.labels, c.text, c.text_mask, c.drop, src)

    def to(self, device) -> "EditCondition":
        c = super().to(device)
        return EditCondition(c.labels, c.text, c.text_mask, c.drop, None if self.source is None else self.source.to(device))


class SourcePrefixBlock(FlowBlock):
    """The deep block of an edit model: prefix = [projected source tokens + their positions ; condition]."""

    def init_source(self, token_dim: int, num_tokens: int, width: int) -> None:
        self.source_proj = nn.Linear(token_dim, width)
        self.source_pos = nn.Parameter(torch.randn(num_tokens, width) * 1e-2)

    def context(self, cond, batch: int, device, *args, **kwargs) -> Context:
        ctx = super().context(cond, batch, device, *args, **kwargs)
        src = getattr(cond, "source", None)
        if src is None:
            raise ValueError("an edit model needs the source image (source=...)")
        s = self.source_proj(src.to(self.source_proj.weight.dtype)) + self.source_pos
        valid = ctx.prefix_valid
        if valid is not None:
            valid = torch.cat([valid.new_ones(valid.shape[0], s.shape[1]), valid], dim=1)
        ctx.prefix = torch.cat([s.to(ctx.prefix.dtype), ctx.prefix], dim=1)
        ctx.prefix_valid = valid
        return ctx


class EditSTARFlow(STARFlow):
    """STARFlow conditioned on a source image (deep-block prefix) and an instruction (text or class)."""

    model_type = "starflow-edit"

    def __init__(self, config: FlowConfig):
        if not config.conditional or config.cond_mode != "prefix":
            raise ValueError("an edit model needs a conditional config with cond_mode='prefix' "
                             "(set cond_dim for text instructions)")
        super().__init__(config)
        deep = self.blocks[-1]
        deep.__class__ = SourcePrefixBlock  # same weights and behaviour, plus the source prefix
        deep.init_source(config.token_dim, config.num_tokens, config.width)
        self._source = None

    @classmethod
    def from_base(cls, base: STARFlow) -> "EditSTARFlow":
        """An edit model initialised from a trained STARFlow: every weight copied, the source projection new
        (zero-initialised, so the source first enters through its position embedding only)."""
        model = cls(base.config)
        missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
        new = [k for k in missing if "source_" not in k]
        if new or unexpected:
            raise ValueError(f"base model does not match: missing {new[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            model.blocks[-1].source_proj.weight.zero_()
            model.blocks[-1].source_proj.bias.zero_()
        return model.to(next(base.parameters()).device)

    def source_tokens(self, source: torch.Tensor, batch: int) -> torch.Tensor:
        if not isinstance(source, torch.Tensor) or source.ndim != 4 or tuple(source.shape[1:]) != self.image_shape:
            got = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
            raise ValueError(f"source must be [B, {', '.join(map(str, self.image_shape))}] in the model's space, got {got}")
        if source.shape[0] != batch:
            raise ValueError(f"got {source.shape[0]} source images for a batch of {batch}")
        return self.patchify(source.float())

    def make_condition(self, batch, y=None, text=None, device=None, source=None):
        cond = super().make_condition(batch, y, text, device)
        source = self._source if source is None else source
        if source is None:
            raise ValueError("an edit model needs the source image (source=...)")
        tokens = self.source_tokens(source.to(device) if device is not None else source, batch)
        return EditCondition(cond.labels, cond.text, cond.text_mask, cond.drop, tokens)

    def forward(self, x, y=None, text=None, cond=None, source=None):
        if cond is None:
            cond = self.make_condition(x.shape[0], y, text, x.device, source)
        return super().forward(x, cond=cond)

    def log_prob(self, x, y=None, text=None, cond=None, source=None):
        if cond is None:
            cond = self.make_condition(x.shape[0], y, text, x.device, source)
        return super().log_prob(x, cond=cond)

    def nll(self, x, y=None, text=None, source=None):
        return -self.log_prob(x, y, text, source=source) / x[0].numel()

    def loss(self, x, y=None, text=None, source=None, cond_drop: torch.Tensor | None = None):
        """Mean NLL (nats/dim) of targets x given (instruction, source); the instruction (never the source)
        is dropped to the null at ``cond_drop_prob`` (or where ``cond_drop`` is True)."""
        cond = self.make_condition(x.shape[0], y, text, x.device, source)
        if self.training and self.config.cond_drop_prob > 0:
            if cond_drop is None:
                drop = torch.rand(x.shape[0], device=x.device) < self.config.cond_drop_prob
            else:
                drop = cond_drop.to(device=x.device, dtype=torch.bool)
            cond = EditCondition(cond.labels, cond.text, cond.text_mask, cond.drop_mask() | drop, cond.source)
        return (-self.log_prob(x, cond=cond) / x[0].numel()).mean()

    @torch.no_grad()
    def inverse(self, z, y=None, text=None, source=None, **kwargs):
        self._source = source
        try:
            return super().inverse(z, y, text, **kwargs)
        finally:
            self._source = None


# ---------------------------------------------------------------------------------------------------
# Pipeline: edit a user's image
# ---------------------------------------------------------------------------------------------------


class EditPipeline(StarflowPipeline):
    """A StarflowPipeline around an EditSTARFlow. ``edit(images, instructions)`` -> uint8 images.
    ``sample`` (used by the trainer's previews) edits ``preview_sources`` when no source is given."""

    preview_sources: torch.Tensor | None = None

    @torch.no_grad()
    def edit(self, images: torch.Tensor, instructions, guidance: float = 0.0, guidance_rule: str = "starflow",
             temperature: float = 1.0, generator: torch.Generator | None = None, **kwargs) -> torch.Tensor:
        from starflow.encode import check_images, float_to_pixels

        images = check_images(self, images)
        x = self.sample(images.shape[0], prompt=instructions, source=images, guidance=guidance,
                        guidance_rule=guidance_rule, temperature=temperature, generator=generator, **kwargs)
        return float_to_pixels(self, x).cpu()

    @torch.no_grad()
    def sample(self, n, y=None, prompt=None, generator=None, device=None, source=None, **kwargs):
        from starflow.encode import to_model_space

        if source is None:
            if self.preview_sources is None:
                raise ValueError("editing needs source images")
            source = self.preview_sources[torch.arange(n) % len(self.preview_sources)]
        if source.dtype == torch.uint8:
            source = to_model_space(self, source)
        source = source.to(self.device)
        if isinstance(prompt, str):
            prompt = [prompt] * n
        if prompt is not None and any(not p.strip() for p in prompt):
            raise ValueError("empty instruction")
        text = self.encode_prompts(prompt) if prompt is not None else None
        model = self.model
        x = model.sample(n, y=y, text=text, generator=generator, device=device or self.device, source=source, **kwargs)
        if self.denoise == "tweedie" and self.noise_std > 0:
            from starflow.denoise import tweedie_denoise

            x = tweedie_denoise(lambda v: model.log_prob(v, y, text, source=source), x, self.noise_std)
        if self.autoencoder is not None:
            x = self.autoencoder.decode(x)
        return x.clamp(-1, 1)

    @classmethod
    def from_pretrained(cls, directory: str, device="cpu", denoise: str | None = None) -> "EditPipeline":
        from starflow.pipeline import INDEX

        index_path = os.path.join(directory, INDEX)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{directory} has no {INDEX}; is it a saved edit pipeline?")
        with open(index_path) as f:
            index = json.load(f)
        model = EditSTARFlow.from_pretrained(os.path.join(directory, index["model"]), map_location=device)
        autoencoder = text_encoder = None
        if index.get("autoencoder"):
            from starflow.autoencoder import Autoencoder

            autoencoder = Autoencoder.from_pretrained(os.path.join(directory, index["autoencoder"]), device=device)
        if index.get("text_encoder"):
            from starflow.text_encoder import TextEncoder

            text_encoder = TextEncoder.from_spec(index["text_encoder"]).to(device)
        return cls(model, autoencoder, text_encoder, index.get("noise_std", 0.0), denoise or index.get("denoise"))


# ---------------------------------------------------------------------------------------------------
# Training (the project trainer)
# ---------------------------------------------------------------------------------------------------


class _EditTrainingSet(torch.utils.data.Dataset):
    """Targets in model space (uint8 pixels, dequantised by the trainer, or latents) + example ids as labels."""

    def __init__(self, targets: torch.Tensor):
        self.targets = targets
        self.ids = torch.arange(len(targets))

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.targets[i], self.ids[i]

    def get_batch(self, idx):
        return self.targets[idx], self.ids[idx]


def build_edit_trainer(model: EditSTARFlow, data: EditDataset, train_cfg, text_encoder, autoencoder=None,
                       decoder=None):
    """A project ``Trainer`` that fits ``model`` on ``data``: x = target (model space), condition =
    (instruction states, source in model space). ``train_cfg`` is a ``TrainConfig``. ``autoencoder`` encodes
    sources and targets (latent models); ``decoder`` (default: the same) is what the exported pipeline
    decodes with (e.g. a decoder fine-tuned on noisy latents)."""
    from starflow.data.captioned import TextTable
    from starflow.train.trainer import Trainer

    src = torch.stack([data[i][0] for i in range(len(data))])
    tgt = torch.stack([data[i][1] for i in range(len(data))])
    pipe_probe = EditPipeline(model, autoencoder, text_encoder, train_cfg.noise_std)
    from starflow.encode import to_model_space

    with torch.no_grad():
        sources = torch.cat([to_model_space(pipe_probe, src[i:i + 256]) for i in range(0, len(src), 256)]).cpu()
        targets = tgt if autoencoder is None else torch.cat(
            [to_model_space(pipe_probe, tgt[i:i + 256]) for i in range(0, len(tgt), 256)]).cpu()
    texts = sorted(set(data.instructions))
    table = TextTable(text_encoder, texts)
    which = torch.tensor([texts.index(t) for t in data.instructions])

    def condition_fn(ids):
        ids = ids.cpu()
        states, mask, _ = table.lookup(which[ids])
        dev = next(model.parameters()).device
        return {"text": (states.to(dev), mask.to(dev)), "source": sources[ids].to(dev)}

    preview_idx = torch.arange(min(16, len(data)))

    def factory(m):
        dec = decoder or autoencoder
        # a decoder fine-tuned on noisy latents cleans samples itself; otherwise one Tweedie step does
        denoise = "decoder" if dec is not None and getattr(dec, "decoder_noise_sigma", None) else "tweedie"
        p = EditPipeline(m, dec, text_encoder, train_cfg.noise_std, denoise)
        p.preview_sources = sources[preview_idx]
        return p

    preview = {"prompt": [data.instructions[int(i)] for i in preview_idx]}
    return Trainer(model, _EditTrainingSet(targets), train_cfg, condition_fn=condition_fn, preview=preview,
                   pipeline_factory=factory)


# The recipe of a latent edit model trained from scratch: the architecture of configs/shapes_t2i.yaml but
# 2x2 latent patches (16 tokens of 16 dims instead of 64 of 4), which made a training step ~4x cheaper on
# the shared 2-core CPU (measured 0.65 s vs ~3 s per batch of 64).
SCRATCH_CONFIG = dict(in_channels=4, image_size=8, patch_size=2, width=128, head_dim=32, num_blocks=4,
                      layers_per_block=1, deep_layers=6, cond_dim=384, max_text_tokens=32, cond_drop_prob=0.1)


def train_main(argv=None) -> str:
    """``python -m starflow.editing``: train (or fine-tune with --base) an edit model on EditDataset('train').

    With ``--base DIR`` (a text-to-image pipeline, e.g. starflow/assets/starflow_shapes) every weight, the
    autoencoder, the text encoder and noise_std come from it (the paper's fine-tuning). Without it a latent
    model of ``SCRATCH_CONFIG`` is trained from scratch on the shipped shapes autoencoder."""
    import argparse

    from starflow.config import TrainConfig

    p = argparse.ArgumentParser(prog="python -m starflow.editing", description=train_main.__doc__.split("\n")[0])
    p.add_argument("--base", help="text-to-image pipeline to fine-tune (default: train from scratch)")
    p.add_argument("--autoencoder", default="shapes", help="scratch only: encoder (shipped name or directory)")
    p.add_argument("--decoder", default="shapes_ft", help="scratch only: decoder to ship (shipped name or directory); "
                                                        "one not fine-tuned on noisy latents ships with Tweedie cleaning")
    p.add_argument("--text-encoder", default="minilm", help="scratch only")
    p.add_argument("--noise-std", type=float, default=0.3, help="scratch only: latent noise of training")
    p.add_argument("--size", type=int, default=8000, help="training triples")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--out-dir", default="runs/edit")
    p.add_argument("--ship", help="copy the exported pipeline here (e.g. starflow/assets/starflow_edit)")
    p.add_argument("--resume", default="auto", help="'auto' (latest valid checkpoint in --out-dir), 'none', or a path")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.base:
        base = StarflowPipeline.from_pretrained(args.base)
        if base.text_encoder is None:
            raise ValueError(f"{args.base} is not a text-conditional pipeline")
        model = EditSTARFlow.from_base(base.model)
        encoder = decoder = base.autoencoder
        text_encoder, noise_std = base.text_encoder, base.noise_std
    else:
        from starflow.autoencoder import resolve_autoencoder
        from starflow.text_encoder import TextEncoder

        encoder, decoder = resolve_autoencoder(args.autoencoder), resolve_autoencoder(args.decoder)
        text_encoder, noise_std = TextEncoder.from_pretrained(args.text_encoder), args.noise_std
        model = EditSTARFlow(FlowConfig(**SCRATCH_CONFIG))
    side = model.config.image_size * (encoder.downsample if encoder is not None else 1)
    data = EditDataset("train", size=args.size, image_size=side)
    cfg = TrainConfig(out_dir=args.out_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                      noise_std=noise_std, warmup_steps=min(100, args.steps // 10 + 1), ema_decay=0.995,
                      ckpt_every=250, sample_every=max(args.steps, 1), log_every=50, seed=args.seed, device="cpu")
    trainer = build_edit_trainer(model, data, cfg, text_encoder, encoder, decoder)
    out = trainer.train(resume=None if args.resume == "none" else args.resume)
    print(f"exported edit pipeline -> {out}")
    if args.ship:
        pipe = EditPipeline.from_pretrained(out)
        recipe = ("python -m starflow.editing " + " ".join(argv if argv is not None else __import__("sys").argv[1:]))
        save_shipped(pipe, args.ship, recipe)
        print(f"shipped (float16 weights) -> {args.ship}")
    return out


def save_shipped(pipe: EditPipeline, directory: str, recipe: str = "") -> None:
    """Write an edit pipeline for shipping: the flow and the autoencoder stored as float16 (loaded back as
    float32), plus RECIPE.md with the command that trained it."""
    import shutil

    if os.path.exists(directory):
        shutil.rmtree(directory)
    pipe.save_pretrained(directory)
    pipe.model.save_pretrained(os.path.join(directory, "model"), dtype=torch.float16)
    if pipe.autoencoder is not None:
        pipe.autoencoder.save_pretrained(os.path.join(directory, "autoencoder"), dtype=torch.float16)
    with open(os.path.join(directory, "RECIPE.md"), "w") as f:
        f.write("# starflow_edit: instruction-editing model (starflow.editing.EditSTARFlow)\n\n"
                f"Trained with:\n\n    {recipe}\n\nWeights stored as float16. Scores: benchmarks/apps.py "
                "section [3] (benchmarks/results/apps.txt).\n")


__all__ = ["EDIT_KINDS", "DIRECTIONS", "MOVE_PX", "Instruction", "parse_instruction", "apply_instruction", "describe",
           "EditExample", "sample_edit", "EditDataset", "infer_edit", "score_edit", "EditCondition", "EditSTARFlow",
           "EditPipeline", "build_edit_trainer", "train_main", "save_shipped"]


if __name__ == "__main__":
    train_main()
