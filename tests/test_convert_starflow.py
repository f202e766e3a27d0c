"""``starflow convert-starflow`` end to end on a .pth written from the official fixture, and its refusals."""
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import load_file

from conftest import FIXTURES
from starflow.cli import main
from starflow.pipeline import StarflowPipeline

PATH = os.path.join(FIXTURES, "starflow_official_small.safetensors")
pytestmark = pytest.mark.skipif(not os.path.exists(PATH), reason="shared fixture not present")


class NotATensor:  # a pickled object that weights_only loading must refuse
    pass


@pytest.fixture(scope="module")
def fixture():
    data = load_file(PATH)
    meta = json.load(open(PATH.replace(".safetensors", ".json")))
    return {k: v for k, v in data.items() if k.startswith("model.")}, data, meta


def _write(tmp_path, state, config):
    pth, cfg = str(tmp_path / "ckpt.pth"), str(tmp_path / "config.json")
    torch.save(state, pth)
    with open(cfg, "w") as f:
        json.dump({"config": config}, f)
    return pth, cfg


def test_convert_end_to_end(tmp_path, fixture, capsys):
    state, d, meta = fixture
    pth, cfg = _write(tmp_path, state, meta["config"])
    out = str(tmp_path / "pipe")
    assert main(["convert-starflow", pth, "--config", cfg, "--out", out, "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "GiB" in printed and "converted" in printed  # the memory estimate comes before loading
    assert sorted(os.listdir(out)) == ["model", "model_index.json"]
    pipe = StarflowPipeline.from_pretrained(out)
    model = pipe.model
    z, logdet = model(d["x"], text=d["y"])
    torch.testing.assert_close(z, d["z"], atol=1e-4, rtol=1e-5)
    guided = model.inverse(d["z_sample"], text=d["y"], negative_text=d["y_null"], guidance=float(meta["guidance"]))
    torch.testing.assert_close(guided, d["x_reverse_guided"], atol=1e-4, rtol=1e-5)
    # The default bf16 conversion loads too (its outputs only approximately equal the fp32 ones).
    out16 = str(tmp_path / "pipe16")
    assert main(["convert-starflow", pth, "--config", cfg, "--out", out16]) == 0
    x16 = StarflowPipeline.from_pretrained(out16).model.inverse(d["z_sample"], text=d["y"])
    assert (x16 - d["x_reverse"]).abs().max().item() < 0.1
    # ... and runs in bf16 (half the memory), close to the official float32 answer.
    model16 = StarflowPipeline.from_pretrained(out16, dtype=torch.bfloat16).model
    assert model16.blocks[-1].proj_in.weight.dtype == torch.bfloat16
    x16 = model16.inverse(d["z_sample"], text=d["y"], negative_text=d["y_null"], guidance=float(meta["guidance"]),
                          sampler="chunked-jacobi")
    assert x16.dtype == torch.float32 and (x16 - d["x_reverse_guided"]).abs().max().item() < 0.1


def test_convert_with_vae_assembles_a_pipeline(tmp_path, fixture):
    from starflow.components.autoencoder import Autoencoder

    state, d, meta = fixture
    vae_dir = os.path.join(os.path.dirname(__import__("starflow").__file__), "assets", "autoencoder_shapes")
    if Autoencoder.from_pretrained(vae_dir).latent_channels != meta["config"]["in_channels"]:
        pytest.skip("no shipped autoencoder with the fixture's latent channels")
    pth, cfg = _write(tmp_path, state, meta["config"])
    out = str(tmp_path / "pipe")
    assert main(["convert-starflow", pth, "--config", cfg, "--out", out, "--vae", vae_dir, "--noise-std", "0.3"]) == 0
    pipe = StarflowPipeline.from_pretrained(out)
    assert pipe.autoencoder is not None and pipe.noise_std == 0.3
    images = pipe.finish(pipe.model.inverse(d["z_sample"][:1], text=d["y"][:1]))
    assert images.shape[1] == pipe.autoencoder.image_channels and images.abs().max() <= 1


def _refused(tmp_path, capsys, pth, cfg, match):
    out = str(tmp_path / "out")
    assert main(["convert-starflow", pth, "--config", cfg, "--out", out]) == 2
    err = capsys.readouterr().err
    assert match in err, err
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".convert-")]  # no temp folder left
    return err


def test_pickle_with_objects_is_refused(tmp_path, fixture, capsys):
    state, _, meta = fixture
    pth, cfg = _write(tmp_path, {**state, "extra": NotATensor()}, meta["config"])
    _refused(tmp_path, capsys, pth, cfg, "objects other than tensors")
    plain = str(tmp_path / "plain.pth")
    with open(plain, "wb") as f:
        pickle.dump({"a": 1}, f)
    _refused(tmp_path, capsys, plain, cfg, "not a readable torch.save checkpoint")


def test_missing_and_unknown_keys_are_listed(tmp_path, fixture, capsys):
    state, _, meta = fixture
    gone = "model.blocks.0.proj_in.weight"
    pth, cfg = _write(tmp_path, {k: v for k, v in state.items() if k != gone}, meta["config"])
    _refused(tmp_path, capsys, pth, cfg, "blocks.0.proj_in.weight")
    pth, cfg = _write(tmp_path, {**state, "model.blocks.0.surprise": torch.zeros(1)}, meta["config"])
    _refused(tmp_path, capsys, pth, cfg, "model.blocks.0.surprise")


def test_config_that_disagrees_with_weights(tmp_path, fixture, capsys):
    state, _, meta = fixture
    wider = {**meta["config"], "channels": 2 * meta["config"]["channels"]}
    pth, cfg = _write(tmp_path, state, wider)
    _refused(tmp_path, capsys, pth, cfg, "disagrees with the config")
    layers = list(meta["config"]["layers_per_block"])
    deeper = {**meta["config"], "layers_per_block": layers[:-1] + [layers[-1] + 1]}
    pth, cfg = _write(tmp_path, state, deeper)
    _refused(tmp_path, capsys, pth, cfg, "missing")
    pth, cfg = _write(tmp_path, state, {**meta["config"], "txt_dim": meta["config"]["txt_dim"] + 1})
    _refused(tmp_path, capsys, pth, cfg, "txt_dim")


def test_wrong_file_kind_and_existing_output(tmp_path, fixture, capsys):
    state, _, meta = fixture
    pth, cfg = _write(tmp_path, state, meta["config"])
    _refused(tmp_path, capsys, PATH, cfg, "expected the official .pth")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["convert-starflow", pth, "--config", cfg, "--out", str(out)]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_large_models_are_sharded(tmp_path):
    from conftest import perturbed, tiny_config
    from starflow import STARFlow
    from starflow.flow.weights import INDEX_NAME

    model = perturbed(STARFlow(tiny_config(**{"positions": "rope", "start_token": True, "num_classes": 3})))
    path = str(tmp_path / "m")
    model.save_pretrained(path, max_shard_bytes=20_000)
    shards = sorted(f for f in os.listdir(path) if f.startswith("model-"))
    assert len(shards) > 2 and INDEX_NAME in os.listdir(path) and "model.safetensors" not in os.listdir(path)
    loaded = STARFlow.from_pretrained(path)
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    model.save_pretrained(path)  # small again: one file, the shards removed
    assert sorted(os.listdir(path)) == ["config.json", "model.safetensors"]
