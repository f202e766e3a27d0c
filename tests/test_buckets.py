"""Aspect-ratio buckets: one model, several token grids; batches never mix buckets."""
import pytest
import torch
from PIL import Image

from conftest import perturbed, tiny_config
from starflow import STARFlow
from starflow.data.buckets import BucketBatches, BucketedImages, nearest_bucket, parse_aspect

SIZES = [(8, 8), (4, 8), (8, 4)]


@pytest.fixture
def model():
    torch.manual_seed(0)
    return perturbed(STARFlow(tiny_config(num_classes=3, buckets=[[4, 8], [8, 4]])))


@pytest.mark.parametrize("hw", SIZES)
def test_round_trip_and_sampling_per_bucket(model, hw):
    x = torch.randn(2, 1, *hw)
    y = torch.tensor([0, 2])
    z, logdet = model(x, y)
    assert z.shape == x.shape and torch.isfinite(logdet).all()
    assert (model.inverse(z, y) - x).abs().max().item() < 1e-4
    assert model.sample(2, y=y, size=hw).shape == (2, 1, *hw)


def test_bucket_uses_sub_grid_of_positions(model):
    """A 4x8 image's tokens carry the position ids of the first two rows of the 4x4 token table."""
    assert model.positions((2, 4), "cpu").tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert model.positions((4, 2), "cpu").tolist() == [0, 1, 4, 5, 8, 9, 12, 13]


def test_unknown_size_rejected(model):
    with pytest.raises(ValueError, match="bucket size"):
        model(torch.randn(1, 1, 6, 8), y=torch.tensor([0]))
    with pytest.raises(ValueError, match="not one of the model's sizes"):
        model.sample(1, y=0, size=(2, 8))


def test_nearest_bucket_and_parse():
    assert nearest_bucket(SIZES, parse_aspect("16:9")) == (4, 8)
    assert nearest_bucket(SIZES, parse_aspect("1:3")) == (8, 4)
    assert nearest_bucket(SIZES, 1.1) == (8, 8)
    with pytest.raises(ValueError, match="W:H"):
        parse_aspect("wide")


def test_batches_hold_one_aspect_ratio_each():
    rng = torch.Generator().manual_seed(0)
    shapes = [(40, 20), (20, 40), (30, 30)]
    images = [Image.new("RGB", shapes[int(torch.randint(0, 3, (1,), generator=rng))], (i, 0, 0)) for i in range(60)]
    data = BucketedImages(images, list(range(60)), SIZES, channels=3)
    batches = BucketBatches(data.bucket_of, batch_size=4, seed=1)
    seen = 0
    for idx in batches.epoch(0):
        x, _ = data.get_batch(idx)
        assert len({data.bucket_of[int(i)] for i in idx}) == 1
        assert tuple(x.shape[2:]) in SIZES
        seen += len(idx)
    assert seen == 4 * len(batches)
    assert [b.tolist() for b in batches.epoch(3)] == [b.tolist() for b in BucketBatches(data.bucket_of, 4, seed=1).epoch(3)]
    with pytest.raises(ValueError, match="one bucket"):
        data.get_batch(torch.tensor([data.bucket_of.index(0), data.bucket_of.index(1)]))


def test_sample_cli_aspect(tmp_path, model):
    from PIL import Image as PILImage

    from starflow.cli import main

    model.save_pretrained(str(tmp_path / "m"))
    out = str(tmp_path / "wide")
    assert main(["sample", str(tmp_path / "m"), "-n", "2", "--aspect", "16:9", "--no-grid", "--out", out]) == 0
    assert PILImage.open(f"{out}/0000.png").size == (8, 4)  # PIL reports (W, H)


def test_training_on_a_folder_of_mixed_aspect_images(tmp_path):
    """A recipe with model.buckets trains on an image folder; every step's batch is one bucket."""
    import json
    import os

    from starflow.flow.config import FlowConfig
    from starflow.train.config import TrainConfig
    from starflow.train.recipe import RunConfig
    from starflow.train.build import build_trainer

    folder = tmp_path / "imgs" / "only"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        w, h = [(32, 16), (16, 32), (24, 24)][i % 3]
        arr = (torch.rand(h, w, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")  # skipped and counted, not fatal
    model = FlowConfig(in_channels=1, image_size=8, patch_size=2, width=32, head_dim=16, num_blocks=2,
                       layers_per_block=1, buckets=[[4, 8], [8, 4]])
    train = TrainConfig(dataset=f"folder:{tmp_path / 'imgs'}", image_size=8, channels=1, out_dir=str(tmp_path / "run"),
                        steps=6, batch_size=4, warmup_steps=1, log_every=1, ckpt_every=6, sample_every=6)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        trainer = build_trainer(RunConfig("starflow", model, train))
    assert trainer.steps_per_epoch == 6  # 8 images per bucket, 2 batches of 4 each
    shapes = {tuple(trainer.dataset.get_batch(trainer.batch_indices(s))[0].shape[2:]) for s in range(6)}
    assert shapes == {(8, 8), (4, 8), (8, 4)}
    trainer.train()
    losses = [json.loads(line)["loss"] for line in open(os.path.join(train.out_dir, "log.jsonl")) if '"loss"' in line]
    assert len(losses) == 6 and all(map(lambda v: v == v, losses))
