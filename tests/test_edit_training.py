"""Edit models train like every other family, through ``starflow train``: the ``shapes-edit`` dataset
hands the trainer (source, instruction, target) triples, the trainer's condition carries the source image
(``Condition.source``) next to the instruction, draws the instruction's dropout for the global batch, and
the export is a folder that ``EditPipeline`` and ``starflow edit`` load."""
import json
import os

import pytest
import torch
import yaml
from PIL import Image

from conftest import perturbed
from starflow import FlowConfig, STARFlow
from starflow.cli import main
from starflow.data.edits import EditDataset, EditPairs
from starflow.data.latents import encode_images
from starflow.errors import ConfigError
from starflow.train.build import build_trainer
from starflow.train.recipe import load_run_config
from starflow.tasks.editing import EditPipeline, EditSTARFlow

RECIPE = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_edit.yaml")

# A pixel-space edit model small enough to train in seconds: 3x8x8 scenes, MiniLM instructions.
TINY = {
    "model_type": "starflow-edit",
    "model": dict(in_channels=3, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2, layers_per_block=1,
                  deep_layers=2, cond_dim=384, cond_drop_prob=0.1),
    "train": dict(dataset="shapes-edit", image_size=8, dataset_size=16, text_encoder="minilm", noise_std=0.05,
                  steps=40, batch_size=8, lr=3e-3, warmup_steps=2, log_every=5, ckpt_every=40, sample_every=40,
                  ema_decay=0.0, device="cpu"),
}


@pytest.fixture(autouse=True)
def _latent_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STARFLOW_CACHE", str(tmp_path / "cache"))


def test_tiny_edit_recipe_trains_through_starflow_train_exports_and_edits(tmp_path, capsys):
    recipe = tmp_path / "edit.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "train": {**TINY["train"], "out_dir": str(tmp_path / "run")}}))
    assert main(["train", "--config", str(recipe)]) == 0
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "run" / "log.jsonl") if '"loss"' in line]
    assert len(losses) >= 4 and losses[-1] < losses[0] - 0.2
    out = str(tmp_path / "run" / "model")
    assert os.path.exists(os.path.join(out, "model_index.json"))
    pipe = EditPipeline.from_pretrained(out)
    assert type(pipe.model) is EditSTARFlow and pipe.model.config.source_prefix and pipe.noise_std == 0.05
    data = EditDataset("train", size=3, image_size=8)
    src = torch.stack([data[i][0] for i in range(3)])
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    edited = pipe.edit(src, data.instructions, guidance=1.0, generator=g())
    assert edited.shape == src.shape and edited.dtype == torch.uint8
    assert torch.equal(edited, pipe.edit(src, data.instructions, guidance=1.0, generator=g()))
    assert not torch.equal(edited, pipe.edit(src.flip(0), data.instructions, guidance=1.0, generator=g()))  # source read
    with pytest.raises(ValueError, match="empty instruction"):
        pipe.edit(src[:1], [" "])
    # ... and the command loads the exported folder
    png, edited_png = str(tmp_path / "s.png"), str(tmp_path / "e.png")
    Image.fromarray(src[0].numpy().transpose(1, 2, 0)).save(png)
    capsys.readouterr()
    assert main(["edit", "--image", png, "--instruction", data.instructions[0], "--model", out, "--out", edited_png]) == 0
    assert Image.open(edited_png).size == (8, 8)


def test_the_trainer_hands_the_source_latent_and_drops_only_the_instruction():
    run = load_run_config(RECIPE, {"train.dataset_size": 16, "train.batch_size": 8, "model.cond_drop_prob": 0.5,
                                   "model.width": 32, "model.deep_layers": 2, "train.device": "cpu"})
    assert run.model_type == "starflow-edit" and run.train.dataset == "shapes-edit"
    trainer = build_trainer(run)
    pairs = EditPairs(EditDataset("train", size=16, image_size=32))
    torch.manual_seed(0)
    x, y, drop = trainer.get_batch(0)[0]
    assert drop is not None and drop.shape == (8,)  # drawn by the trainer for the global batch
    cond = trainer.loss_condition(y, drop)["cond"]
    assert torch.equal(cond.drop, drop)
    # the source of every row (dropped or not) is that example's source, encoded like the targets
    autoencoder = trainer.pipeline(trainer.model).autoencoder
    latents = encode_images(autoencoder, pairs.sources)
    assert torch.equal(cond.source, latents[y])
    assert torch.equal(trainer.dataset.latents, encode_images(autoencoder, pairs.images))  # the targets
    # the instruction is each example's own: rows with the same instruction get the same states
    ids = pairs.caption_ids[y]
    for i in range(8):
        for j in range(8):
            assert torch.equal(cond.text[i], cond.text[j]) == bool(ids[i] == ids[j])
    # the loss reads both: the dropout mask, and the source even where the instruction is dropped
    model = trainer.model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
        none, every = torch.zeros(8, dtype=torch.bool), torch.ones(8, dtype=torch.bool)
        kept = model.loss(x, cond=trainer.loss_condition(y, none)["cond"])
        dropped = model.loss(x, cond=trainer.loss_condition(y, every)["cond"])
        assert torch.isfinite(kept) and torch.isfinite(dropped) and not torch.equal(kept, dropped)
        other = trainer.loss_condition(y, every)["cond"]
        other.source = other.source.flip(0)
        assert not torch.equal(dropped, model.loss(x, cond=other))
    # previews and the export go through the edit pipeline, with the first examples' sources
    pipe = trainer.pipeline(trainer.ema.module)
    assert isinstance(pipe, EditPipeline) and pipe.denoise == "decoder"
    assert torch.equal(pipe.preview_sources, latents[:16])
    assert trainer.preview["prompt"] == pairs.instructions[:16]


@pytest.mark.parametrize("change, message", [
    ({"model_type": "starflow"}, "only an edit model"),
    ({"train.text_encoder": None, "model.cond_dim": 0, "model.num_classes": 3}, "text encoder"),
])
def test_edit_data_needs_an_edit_model_and_a_text_encoder(change, message):
    overrides = {"train.dataset_size": 8, "train.batch_size": 8, "model.width": 32, "model.deep_layers": 1,
                 "train.device": "cpu", **change}
    run = load_run_config(RECIPE, overrides)
    with pytest.raises(ConfigError, match=message):
        build_trainer(run)


def test_init_from_starts_an_edit_model_from_a_text_to_image_flow(tmp_path):
    """train.init_from: every weight of a saved text-to-image STARFlow, the edit model's source projection at
    zero; a model of another architecture is refused with the fields that differ."""
    overrides = {"train.dataset_size": 8, "train.batch_size": 8, "train.device": "cpu", "model.width": 32,
                 "model.deep_layers": 1, "model.num_blocks": 2}
    run = load_run_config(RECIPE, overrides)
    fields = {k: getattr(run.model, k) for k in ("in_channels", "image_size", "patch_size", "width", "head_dim",
                                                 "num_blocks", "layers_per_block", "deep_layers", "cond_dim",
                                                 "max_text_tokens", "cond_drop_prob")}
    base = perturbed(STARFlow(FlowConfig(**fields)), 0.02)
    base.save_pretrained(str(tmp_path / "t2i"))
    model = build_trainer(load_run_config(RECIPE, {**overrides, "train.init_from": str(tmp_path / "t2i")})).model
    weights = model.state_dict()
    for k, v in base.state_dict().items():
        assert torch.equal(weights[k], v), k
    new = [k for k in weights if k not in base.state_dict()]
    assert new and all("source_" in k for k in new)
    assert not model.blocks[-1].source_proj.weight.any() and not model.blocks[-1].source_proj.bias.any()
    with pytest.raises(ConfigError, match="width 32 there, 64 here"):
        build_trainer(load_run_config(RECIPE, {**overrides, "model.width": 64, "train.init_from": str(tmp_path / "t2i")}))
