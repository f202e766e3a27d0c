"""Instruction editing: the (source, instruction, target) generator is consistent (checked on the specs and
with ShapesEval's detector on the rendered images), the scorer, and the source-prefix edit model."""
import json
import zlib
from collections import Counter
from dataclasses import replace

import pytest
import torch

from conftest import perturbed
from starflow import FlowConfig, STARFlow
from starflow.data.shapes import Claim, ObjectSpec, Requirement, SceneSpec, render_spec
from starflow.tasks.editing import (DIRECTIONS, EDIT_KINDS, MOVE_PX, EditDataset, EditPipeline, EditSTARFlow, Instruction,
                              apply_instruction, infer_edit, parse_instruction, score_edit)
from starflow.components.text_encoder import TextEmbedding


@pytest.fixture(scope="module")
def data():
    return EditDataset("test", size=48)


def _objs(spec):
    return list(spec.objects)


def test_generator_triples_are_consistent_on_specs(data):
    kinds = Counter(e.kind for e in data.examples)
    assert kinds == {k: 12 for k in EDIT_KINDS}  # kinds cycle: every prefix is balanced
    step = MOVE_PX / 32
    for ex in data.examples:
        ins, src, tgt, i = ex.instruction, _objs(ex.source), _objs(ex.target), ex.index
        assert parse_instruction(ex.text) == ins
        if ins.kind != "add":  # "the X" names exactly one object of the source
            assert [o.shape for o in src].count(ins.shape) == 1 and src[i].shape == ins.shape
        if ins.kind == "recolour":
            assert src[i].colour != ins.colour
            assert tgt == src[:i] + [replace(src[i], colour=ins.colour)] + src[i + 1:]
        elif ins.kind == "remove":
            assert len(src) >= 2 and tgt == src[:i] + src[i + 1:]
        elif ins.kind == "add":
            assert tgt[:-1] == src and i == len(tgt) - 1
            assert (tgt[-1].shape, tgt[-1].colour) == (ins.shape, ins.colour)
        else:
            dx, dy = DIRECTIONS[ins.direction]
            moved = replace(src[i], centre=(round(src[i].centre[0] + dx * step, 6), round(src[i].centre[1] + dy * step, 6)))
            assert tgt == src[:i] + [moved] + src[i + 1:]
        for o in tgt:  # the target is a valid scene: inside the margins, boxes >= 3 px apart
            assert all(1 / 32 + o.radius - 1e-6 <= c <= 1 - 1 / 32 - o.radius + 1e-6 for c in o.centre)
        for j, a in enumerate(tgt):
            for b in tgt[j + 1:]:
                gap = max(abs(a.centre[0] - b.centre[0]), abs(a.centre[1] - b.centre[1])) - a.radius - b.radius
                assert gap >= 3 / 32 - 1e-6
        # the target caption lists its objects and is true of them
        from starflow.evaluation.shapes_eval import check_claim

        assert check_claim(ex.target.objects, ex.target.claim)[0]


def test_generator_triples_verified_by_the_detector(data):
    """ShapesEval's detector on the rendered images sees exactly the requested change, and nothing else."""
    for i, ex in enumerate(data.examples):
        src, tgt, text = data[i]
        assert src.shape == tgt.shape == (3, 32, 32) and src.dtype == torch.uint8
        assert infer_edit(src, tgt) == ex.instruction, (text, infer_edit(src, tgt))
        good = score_edit(src, tgt, text)
        assert good["passed"] and good["rest_ok"]
        bad = score_edit(src, src, text)  # no change made: fails
        assert not bad["passed"] and bad["detected"] is None


def test_dataset_is_deterministic_and_splits_differ():
    a, b = EditDataset("train", size=6), EditDataset("train", size=10)
    assert a.examples == b.examples[:6]  # example i does not depend on the dataset size
    c = EditDataset("test", size=6)
    assert a.instructions != c.instructions or a.examples != c.examples
    assert all(torch.equal(x, y) for x, y in zip(a[3], b[3]) if isinstance(x, torch.Tensor))
    with pytest.raises(ValueError, match="split"):
        EditDataset("val")
    with pytest.raises(ValueError, match="kinds"):
        EditDataset("train", kinds=("rotate",))


def _scene(*objs):
    return SceneSpec(tuple(objs), Claim("colors", (Requirement(objs[0].shape),)))


def test_apply_instruction_refuses_ambiguous_or_impossible_edits():
    c1 = ObjectSpec("circle", "red", "small", (0.25, 0.25), 0.14)
    c2 = ObjectSpec("circle", "blue", "small", (0.75, 0.75), 0.14)
    sq = ObjectSpec("square", "green", "small", (0.75, 0.25), 0.14)
    with pytest.raises(ValueError, match="ambiguous"):
        apply_instruction(_scene(c1, c2), parse_instruction("make the circle green"))
    with pytest.raises(ValueError, match="absent"):
        apply_instruction(_scene(c1), parse_instruction("remove the triangle"))
    with pytest.raises(ValueError, match="already red"):
        apply_instruction(_scene(c1, sq), parse_instruction("make the circle red"))
    with pytest.raises(ValueError, match="only object"):
        apply_instruction(_scene(c1), parse_instruction("remove the circle"))
    with pytest.raises(ValueError, match="leave the image"):
        apply_instruction(_scene(c1, sq), parse_instruction("move the circle to the left"))
    with pytest.raises(ValueError, match="hit another"):
        apply_instruction(_scene(c1, sq), parse_instruction("move the circle to the right"))
    tgt, i = apply_instruction(_scene(c1, sq), parse_instruction("move the circle down"))
    assert tgt.objects[i].centre == (0.25, 0.5) and tgt.objects[1] == sq
    with pytest.raises(ValueError, match="rng"):
        apply_instruction(_scene(c1), parse_instruction("add a red square"))


def test_parse_instruction_grammar():
    assert parse_instruction("  Make the Circle BLUE. ") == Instruction("recolour", "circle", colour="blue")
    assert parse_instruction("remove the square") == Instruction("remove", "square")
    assert parse_instruction("add a red triangle") == Instruction("add", "triangle", colour="red")
    assert parse_instruction("move the triangle to the left") == Instruction("move", "triangle", direction="left")
    assert parse_instruction("move the square up") == Instruction("move", "square", direction="up")
    for ins in (Instruction("recolour", "square", colour="yellow"), Instruction("move", "circle", direction="down")):
        assert parse_instruction(ins.text) == ins
    for bad in ("", "make the hexagon blue", "make the circle purple", "rotate the square", "move the circle far"):
        with pytest.raises(ValueError):
            parse_instruction(bad)


def test_infer_edit_rejects_two_changes():
    a = ObjectSpec("circle", "red", "medium", (0.3, 0.3), 0.18)
    b = ObjectSpec("square", "blue", "medium", (0.7, 0.7), 0.18)
    src = render_spec(_scene(a, b), 32)
    both = render_spec(_scene(replace(a, colour="green"), replace(b, colour="yellow")), 32)
    assert infer_edit(src, both) is None
    assert not score_edit(src, both, "make the circle green")["passed"]
    # the requested object changed, but another one moved too: change seen, rest not kept
    other = render_spec(_scene(replace(a, colour="green"), replace(b, centre=(0.7, 0.45))), 32)
    r = score_edit(src, other, "make the circle green")
    assert not r["passed"] and not r["rest_ok"]


# -------------------------------------------------------------------------------------------- model

class StubText:
    """A deterministic stand-in text encoder: each word -> a fixed random vector (no model to load)."""

    dim = 12

    def _word(self, w):
        return torch.randn(self.dim, generator=torch.Generator().manual_seed(zlib.crc32(w.encode())))

    def encode(self, prompts, **kw):
        words = [p.split() for p in prompts]
        L = max(len(w) for w in words)
        states = torch.zeros(len(prompts), L, self.dim)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for i, ws in enumerate(words):
            for j, w in enumerate(ws):
                states[i, j], mask[i, j] = self._word(w), True
        return TextEmbedding(states, mask, states.sum(1) / mask.sum(1, keepdim=True))

    def encode_dataset(self, captions, batch_size=64, **kw):
        return self.encode(captions)

    def to(self, device):
        return self

    def to_spec(self):
        return {"name": "stub"}


def _cfg(**kw):
    base = dict(in_channels=3, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2, layers_per_block=1,
                deep_layers=2, cond_dim=12)
    base.update(kw)
    return FlowConfig(**base)


def test_edit_model_is_exact_reads_the_source_and_loads(tmp_path):
    torch.manual_seed(0)
    base = perturbed(STARFlow(_cfg()))
    model = EditSTARFlow.from_base(base)
    for k, v in base.state_dict().items():  # every base weight copied
        assert torch.equal(model.state_dict()[k], v)
    perturbed(model, 0.05, seed=3)
    x, src = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    text = StubText().encode(["make the circle blue", "remove the square"])
    text = (text.states, text.mask)
    z, logdet = model(x, text=text, source=src)
    assert (model.inverse(z, text=text, source=src) - x).abs().max() < 1e-4
    assert (model(x, text=text, source=src.flip(0))[0] - z).abs().max() > 1e-3  # the source is read
    g = model.inverse(z, text=text, source=src, guidance=2.0)  # guided: source kept in both branches
    assert g.shape == x.shape and torch.isfinite(g).all()
    with pytest.raises(ValueError, match="source"):
        model(x, text=text)
    with pytest.raises(ValueError, match="source must be"):
        model(x, text=text, source=torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="conditional"):
        EditSTARFlow(_cfg(cond_dim=0))
    model.save_pretrained(str(tmp_path / "m"))
    again = EditSTARFlow.from_pretrained(str(tmp_path / "m")).eval()
    assert torch.equal(again(x, text=text, source=src)[0], z)
    assert json.load(open(tmp_path / "m" / "config.json"))["model_type"] == "starflow-edit"


def test_edit_cli(tmp_path, monkeypatch, capsys):
    from PIL import Image

    import starflow.tasks.editing as editing
    from starflow.cli import main

    torch.manual_seed(0)
    pipe = EditPipeline(perturbed(EditSTARFlow(_cfg(image_size=32, patch_size=8)), 0.02), text_encoder=StubText())
    monkeypatch.setattr(editing.EditPipeline, "from_pretrained", classmethod(lambda cls, d, device="cpu": pipe))
    data = EditDataset("test", size=1)
    src = tmp_path / "s.png"
    Image.fromarray(data[0][0].numpy().transpose(1, 2, 0)).save(src)
    out = str(tmp_path / "e.png")
    (tmp_path / "model").mkdir()
    args = ["edit", "--image", str(src), "--instruction", data.instructions[0], "--out", out, "--model",
            str(tmp_path / "model"), "--check"]
    assert main(args) == 0
    assert Image.open(out).size == (32, 32) and "detected change" in capsys.readouterr().out
    assert main(args[:3] + ["--instruction", "rotate the square"] + args[5:]) == 0
    assert "outside the grammar" in capsys.readouterr().err
    assert main(args[:3] + ["--instruction", "  "] + args[5:]) == 2
    assert "empty instruction" in capsys.readouterr().err
    assert main(["edit", "--image", str(src), "--instruction", "remove the square", "--model", str(tmp_path / "none")]) == 2
    assert "edit model not found" in capsys.readouterr().err


def test_edit_takes_the_model_s_stored_settings():
    """Settings left unset come from model_index.json's "sampling" (the CLI passes None too)."""
    torch.manual_seed(0)
    pipe = EditPipeline(perturbed(EditSTARFlow(_cfg(image_size=32, patch_size=8)), 0.02), text_encoder=StubText(),
                        sampling={"guidance": 1.5, "temperature": 0.3})
    data = EditDataset("test", size=2)
    src = torch.stack([data[i][0] for i in range(2)])

    def edit(**kw):
        return pipe.edit(src, data.instructions, generator=torch.Generator().manual_seed(0), **kw)

    assert torch.equal(edit(), edit(guidance=1.5, temperature=0.3))
    assert not torch.equal(edit(), edit(guidance=0.0, temperature=1.0))
