"""Editing data: instructions, applying one to a scene, the (source, instruction, target) dataset, and its
training view for the trainer (``EditPairs``: targets with example ids, captions and source images)."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch

from starflow.data.shapes import (COLOURS, MARGIN_PX, MIN_GAP_PX, REFERENCE_SIZE, SHAPES, SIZE_RADII_PX, Claim,
                                  ObjectSpec, Requirement, SceneSpec, _px, render_spec, sample_spec)
from starflow.data.tensors import LabelledImages


EDIT_KINDS: tuple[str, ...] = ("recolour", "remove", "add", "move")
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
MOVE_PX = 8.0          # how far "move" shifts an object, px at the 32 px reference size
TOL_PX = 2.5           # position tolerance of the scorer, px at 32 px
EDIT_TRAIN_SEED = 20250611
EDIT_TEST_SEED = 20250612
EDIT_SPLIT_SEEDS = {"train": EDIT_TRAIN_SEED, "test": EDIT_TEST_SEED}
#: source scene categories (from starflow.data.shapes) used for editing; counting scenes (N identical
#: objects) rarely allow "the X" and are left out.
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


class EditPairs(LabelledImages):
    """An ``EditDataset`` as the trainer reads it: ``images`` the targets (uint8), ``labels`` the example
    ids, ``sources`` the source images (uint8, aligned with the targets), ``captions`` the unique
    instructions (sorted) and ``caption_ids`` each example's row in them, so the text encoder runs once
    per instruction. The trainer hands the example ids to its condition, which looks up both the
    instruction and the source image of each row."""

    def __init__(self, data: EditDataset):
        pairs = [data[i] for i in range(len(data))]
        if not pairs:
            raise ValueError("an edit dataset needs at least one example")
        self.sources = torch.stack([p[0] for p in pairs])
        self.images = torch.stack([p[1] for p in pairs])
        self.labels = torch.arange(len(pairs))
        self.captions = sorted(set(data.instructions))
        row = {c: i for i, c in enumerate(self.captions)}
        self.caption_ids = torch.tensor([row[t] for t in data.instructions], dtype=torch.long)
        self.instructions = data.instructions

    def source_images(self) -> LabelledImages:
        """The sources as a dataset of their own (same example ids), e.g. to encode and cache them."""
        view = LabelledImages()
        view.images, view.labels = self.sources, self.labels
        return view
