"""Every bad input and fault from the fault-finding round, as one table: each case runs the CLI and must
end with exit status 2, one line naming the problem, no traceback, and no output file left behind."""
import gc
import json
import os
import socket
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import perturbed, tiny_config
from starflow import STARFlow
from starflow.cli import main
from starflow.io.shipped import DEFAULT_DIGITS_MODEL

TINY_RECIPE = """model:
  image_size: 8
  patch_size: 2
  width: 32
  head_dim: 16
  num_blocks: 2
  layers_per_block: 1
  num_classes: 10
train:
  dataset: digits
  batch_size: 16
  warmup_steps: 1
  log_every: 1
  sample_every: 100000
  ckpt_every: 1
  steps: 2
"""


def bomb_png(path: str, side: int = 20000) -> str:
    """A few-hundred-byte PNG whose header claims side x side pixels (Pillow refuses it from the header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    raw += chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(raw)
    return path


def _save_model(d: str, config_edit=None, weights_edit=None) -> str:
    torch.manual_seed(0)
    model = perturbed(STARFlow(tiny_config(num_classes=3)))
    model.save_pretrained(d)
    if config_edit is not None:
        with open(os.path.join(d, "config.json")) as f:
            cfg = json.load(f)
        cfg = config_edit(cfg)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f)
    if weights_edit is not None:
        from safetensors.torch import load_file, save_file

        path = os.path.join(d, "model.safetensors")
        save_file(weights_edit(load_file(path)), path)
    return d


def _set(**kw):
    return lambda cfg: {**cfg, **kw}


def _nan_first(state):
    k = next(k for k, v in state.items() if v.is_floating_point())
    state[k] = state[k].clone()
    state[k].view(-1)[0] = float("nan")
    return state


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Files every case draws on: good and broken model folders, recipes, images, configs."""
    root = tmp_path_factory.mktemp("bad")
    p = lambda *parts: str(root.joinpath(*parts))  # noqa: E731
    e = {"root": str(root)}
    e["good"] = _save_model(p("good"))
    e["wrong_shapes"] = _save_model(p("wrong_shapes"), _set(width=64, head_dim=16))
    e["config_list"] = _save_model(p("config_list"), lambda cfg: [cfg])
    e["width_str"] = _save_model(p("width_str"), _set(width="128"))
    e["width_null"] = _save_model(p("width_null"), _set(width=None))
    e["huge_width"] = _save_model(p("huge_width"), _set(width=1_000_000_000, head_dim=16))
    e["huge_blocks"] = _save_model(p("huge_blocks"), _set(num_blocks=100_000, width=1024, head_dim=16))
    e["huge_image"] = _save_model(p("huge_image"), _set(image_size=200_000))
    e["huge_classes"] = _save_model(p("huge_classes"), _set(num_classes=1_000_000_000))
    e["nan_weights"] = _save_model(p("nan_weights"), weights_edit=_nan_first)
    # A pipeline whose index points outside its folder.
    os.makedirs(p("escape"))
    with open(p("escape", "model_index.json"), "w") as f:
        json.dump({"model": "../good"}, f)
    # A pipeline whose text encoder folder holds only pickled weights.
    os.makedirs(p("pickled_te", "te"))
    _save_model(p("pickled_te", "model"))
    with open(p("pickled_te", "te", "config.json"), "w") as f:
        json.dump({"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1,
                   "intermediate_size": 8, "vocab_size": 16}, f)
    torch.save({"embeddings.word_embeddings.weight": torch.zeros(16, 8)}, p("pickled_te", "te", "pytorch_model.bin"))
    with open(p("pickled_te", "model_index.json"), "w") as f:
        json.dump({"model": "model", "text_encoder": {"path": p("pickled_te", "te")}}, f)
    # Images.
    e["bomb"] = bomb_png(p("bomb.png"))
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(p("digit.png"))
    e["digit"] = p("digit.png")
    os.makedirs(p("bomb_folder", "a"))
    for i in range(3):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(p("bomb_folder", "a", f"{i}.png"))
    bomb_png(p("bomb_folder", "a", "huge.png"))
    # A noise file naming a folder that is not a saved model.
    from starflow.tasks.encode import save_noise

    save_noise(p("noise.safetensors"), torch.zeros(1, 1, 28, 28), "/etc", y=[1])
    # Recipes.
    recipes = {
        "recipe": TINY_RECIPE,
        "model_list": "model:\n  - 1\n  - 2\ntrain:\n  dataset: digits\n",
        "width_x": TINY_RECIPE.replace("width: 32", 'width: "x"'),
        "yaml_tag": "model: !!python/object/apply:os.system ['true']\n",
        "bad_yaml": "model:\n  width: [32\n",
        "device_bad": TINY_RECIPE + "  device: bad\n",
        "recipe_huge": TINY_RECIPE.replace("width: 32", "width: 1000000000"),
        "folder_bomb": TINY_RECIPE.replace("dataset: digits", f"dataset: folder:{p('bomb_folder')}\n  image_size: 8"),
    }
    for name, text in recipes.items():
        with open(p(f"{name}.yaml"), "w") as f:
            f.write(text)
        e[name] = p(f"{name}.yaml")
    # TARFlow configs.
    official = {"in_channels": 1, "img_size": 8, "patch_size": 2, "channels": 32, "layers_per_block": 1}
    for name, value in {"tf_missing": official, "tf_string": "abc", "tf_list": [official]}.items():
        with open(p(f"{name}.json"), "w") as f:
            json.dump(value, f)
        e[name] = p(f"{name}.json")
    e["tf_ckpt"] = os.path.join(e["good"], "model.safetensors")
    # A file where a folder is expected.
    with open(p("a_file"), "w") as f:
        f.write("x")
    e["a_file"] = p("a_file")
    e["out"] = p("out")
    return e


def _busy_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(1)
    return s


# id -> (argv built from env, what the message must contain, the output that must not exist)
CASES = {
    # checkpoints and configs
    "sample-wrong-shapes": (lambda e: ["sample", e["wrong_shapes"], "--out", e["out"] + "/s.png"], "wrong shape"),
    "nll-wrong-shapes": (lambda e: ["nll", e["wrong_shapes"], "--image", e["digit"]], "wrong shape"),
    "encode-wrong-shapes": (lambda e: ["encode", "--model", e["wrong_shapes"], "--image", e["digit"],
                                       "--out", e["out"] + "/n.safetensors"], "wrong shape"),
    "config-json-list": (lambda e: ["sample", e["config_list"], "--out", e["out"] + "/s.png"], "JSON object"),
    "config-width-string": (lambda e: ["sample", e["width_str"], "--out", e["out"] + "/s.png"],
                            "width: must be an integer"),
    "config-width-null": (lambda e: ["sample", e["width_null"], "--out", e["out"] + "/s.png"],
                          "width: must be an integer"),
    "config-huge-width": (lambda e: ["sample", e["huge_width"], "--out", e["out"] + "/s.png"], "would need about"),
    "config-huge-blocks": (lambda e: ["sample", e["huge_blocks"], "--out", e["out"] + "/s.png"], "would need about"),
    "config-huge-image": (lambda e: ["sample", e["huge_image"], "--out", e["out"] + "/s.png"], "would need about"),
    "config-huge-classes": (lambda e: ["sample", e["huge_classes"], "--out", e["out"] + "/s.png"], "would need about"),
    "nan-weights": (lambda e: ["sample", e["nan_weights"], "--out", e["out"] + "/s.png"], "NaN or infinity"),
    "index-escapes-folder": (lambda e: ["sample", os.path.join(e["root"], "escape"), "--out", e["out"] + "/s.png"],
                             "points outside"),
    "text-encoder-pickle": (lambda e: ["sample", os.path.join(e["root"], "pickled_te"), "--out", e["out"] + "/s.png"],
                            "no safetensors weights"),
    "noise-names-non-model": (lambda e: ["decode", "--noise", os.path.join(e["root"], "noise.safetensors"),
                                         "--out", e["out"] + "/d.png"], "not a saved model folder"),
    # recipes
    "recipe-model-list": (lambda e: ["train", "--config", e["model_list"], "--out-dir", e["out"]], "must be a mapping"),
    "recipe-width-x": (lambda e: ["train", "--config", e["width_x"], "--out-dir", e["out"]], "width: must be an integer"),
    "recipe-yaml-tag": (lambda e: ["train", "--config", e["yaml_tag"], "--out-dir", e["out"]], "not valid YAML"),
    "recipe-invalid-yaml": (lambda e: ["train", "--config", e["bad_yaml"], "--out-dir", e["out"]], "not valid YAML"),
    "set-invalid-yaml": (lambda e: ["train", "--config", e["recipe"], "--out-dir", e["out"], "--set", "model.width=[32"],
                         "not valid YAML"),
    "config-is-folder": (lambda e: ["train", "--config", e["root"], "--out-dir", e["out"]], "is a folder"),
    "train-steps-0": (lambda e: ["train", "--config", e["recipe"], "--out-dir", e["out"], "--steps", "0"],
                      "steps: must be positive"),
    "train-device-bad": (lambda e: ["train", "--config", e["device_bad"], "--out-dir", e["out"]], "device"),
    "recipe-huge-width": (lambda e: ["train", "--config", e["recipe_huge"], "--out-dir", e["out"]], "would need about"),
    "tarflow-missing-num-blocks": (lambda e: ["convert-tarflow", e["tf_ckpt"], "--config", e["tf_missing"],
                                              "--out", e["out"]], "num_blocks"),
    "tarflow-config-string": (lambda e: ["convert-tarflow", e["tf_ckpt"], "--config", e["tf_string"],
                                         "--out", e["out"]], "JSON object"),
    "tarflow-config-list": (lambda e: ["convert-tarflow", e["tf_ckpt"], "--config", e["tf_list"],
                                       "--out", e["out"]], "JSON object"),
    "tarflow-config-folder": (lambda e: ["convert-tarflow", e["tf_ckpt"], "--config", e["root"],
                                         "--out", e["out"]], "is a folder"),
    # decompression bombs
    "encode-bomb": (lambda e: ["encode", "--image", e["bomb"], "--out", e["out"] + "/n.safetensors"], "too large"),
    "nll-image-bomb": (lambda e: ["nll", "--image", e["bomb"]], "too large"),
    "inpaint-mask-bomb": (lambda e: ["inpaint", "--image", e["digit"], "--mask", e["bomb"],
                                     "--out", e["out"] + "/i.png"], "too large"),
    "edit-bomb": (lambda e: ["edit", "--image", e["bomb"], "--instruction", "make the circle blue",
                             "--out", e["out"] + "/e.png"], "too large"),
    "train-folder-bomb": (lambda e: ["train", "--config", e["folder_bomb"], "--out-dir", e["out"]], "too large"),
    # a file where a folder is expected
    "sample-out-under-file": (lambda e: ["sample", "--out", e["a_file"] + "/s.png"], "is a file"),
    "sample-no-grid-out-is-file": (lambda e: ["sample", "--no-grid", "--out", e["a_file"]], "is a file"),
    "generate-out-under-file": (lambda e: ["generate", "--class", "3", "--out", e["a_file"] + "/g.png"], "is a file"),
    "encode-out-under-file": (lambda e: ["encode", "--image", e["digit"], "--out", e["a_file"] + "/n.safetensors"],
                              "is a file"),
    "eval-out-under-file": (lambda e: ["eval", e["good"], "--out", e["a_file"] + "/r.json"], "is a file"),
    "train-out-dir-is-file": (lambda e: ["train", "--config", e["recipe"], "--out-dir", e["a_file"]], "is a file"),
    "convert-out-under-file": (lambda e: ["convert-tarflow", e["tf_ckpt"], "--config", e["tf_missing"],
                                          "--out", e["a_file"] + "/m"], "is a file"),
    # arguments
    "decode-class-abc": (lambda e: ["decode", "--noise", "n.safetensors", "--out", e["out"] + "/d.png",
                                    "--class", "abc"], ""),
    "eval-unknown-sample-arg": (lambda e: ["eval", DEFAULT_DIGITS_MODEL, "--sample-arg", "foo=1",
                                           "--metrics", "nll"], "unknown sampling option"),
    "nll-batch-size-0": (lambda e: ["nll", "--batch-size", "0"], "--batch-size must be >= 1"),
    "nll-batch-size-negative": (lambda e: ["nll", "--batch-size", "-1"], "--batch-size must be >= 1"),
    "eval-batch-size-0": (lambda e: ["eval", DEFAULT_DIGITS_MODEL, "--batch-size", "0"], "--batch-size must be >= 1"),
    "eval-batch-size-negative": (lambda e: ["eval", DEFAULT_DIGITS_MODEL, "--batch-size", "-1"],
                                 "--batch-size must be >= 1"),
    "sample-temperature-inf": (lambda e: ["sample", "--temperature", "inf", "--out", e["out"] + "/s.png"], "temperature"),
    "inpaint-temperature-inf": (lambda e: ["inpaint", "--image", e["digit"], "--mask", e["digit"], "--temperature",
                                           "inf", "--out", e["out"] + "/i.png"], "temperature"),
    "edit-temperature-inf": (lambda e: ["edit", "--image", os.path.join(e["root"], "rgb.png"), "--instruction",
                                        "make the circle blue", "--temperature", "inf",
                                        "--out", e["out"] + "/e.png"], "temperature"),
    "inpaint-steps-100000": (lambda e: ["inpaint", "--image", e["digit"], "--mask", e["digit"], "--steps", "100000",
                                        "--out", e["out"] + "/i.png"], "between 1 and"),
    "sample-too-many-images": (lambda e: ["sample", "-n", "100000000", "--out", e["out"] + "/s.png"], "--num-images"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_clear_line(case, env, capsys):
    build, needle = CASES[case]
    if case == "edit-temperature-inf":
        from starflow.tasks.editing import DEFAULT_EDIT_MODEL

        if not os.path.isdir(DEFAULT_EDIT_MODEL):
            pytest.skip("no shipped edit model")
        Image.new("RGB", (32, 32)).save(os.path.join(env["root"], "rgb.png"))
    argv = build(env)
    capsys.readouterr()
    if case == "decode-class-abc":  # an option decode does not take: argparse's own one-line error
        with pytest.raises(SystemExit) as exc:
            main(argv)
        rc = exc.value.code
    else:
        rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert needle in lines[0], err
    assert "Traceback" not in err
    assert not os.path.exists(env["out"]) or not os.listdir(env["out"]), os.listdir(env["out"])


def test_serve_on_a_port_in_use(capsys):
    s = _busy_port()
    try:
        rc = main(["serve", "--port", str(s.getsockname()[1])])
    finally:
        s.close()
    err = capsys.readouterr().err
    assert rc == 2 and "already in use" in err.lower() and "Traceback" not in err and len(err.splitlines()) == 1


def test_debug_shows_the_traceback(env):
    """The console script: one line by default; --debug or STARFLOW_DEBUG=1 re-raises with a traceback."""
    code = "import sys; from starflow.cli import main; sys.exit(main(sys.argv[1:]))"
    args = [sys.executable, "-c", code, "sample", env["config_list"], "--out", env["out"] + "/s.png"]
    plain = subprocess.run(args, capture_output=True, text=True)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run(args + ["--debug"], capture_output=True, text=True)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
    envvar = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "STARFLOW_DEBUG": "1"})
    assert "Traceback" in envvar.stderr


# ---- read-only outputs and full disks: a small tmpfs (root only) -----------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, ro) -> a fresh tmpfs folder; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = []

    def mount(size: str, ro: bool = False) -> str:
        d = str(tmp_path / f"fs{len(mounted)}")
        os.makedirs(d)
        opts = f"size={size}" + (",ro" if ro else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", d], capture_output=True, text=True)
        if r.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(d)
        return d

    yield mount
    gc.collect()  # safetensors maps files: drop the mappings before unmounting
    for d in mounted:
        if subprocess.run(["umount", d], capture_output=True).returncode:
            subprocess.run(["umount", "-l", d], capture_output=True)


@pytest.mark.parametrize("command", ["sample", "generate", "encode", "eval", "train", "convert-tarflow"])
def test_read_only_output(command, tmpfs, env, capsys):
    ro = tmpfs("1m", ro=True)
    argv = {
        "sample": ["sample", "--out", ro + "/s.png"],
        "generate": ["generate", "--class", "3", "--out", ro + "/g.png"],
        "encode": ["encode", "--image", env["digit"], "--out", ro + "/n.safetensors"],
        "eval": ["eval", env["good"], "--out", ro + "/r.json"],
        "train": ["train", "--config", env["recipe"], "--out-dir", ro + "/run"],
        "convert-tarflow": ["convert-tarflow", env["tf_ckpt"], "--config", env["tf_missing"], "--out", ro + "/m"],
    }[command]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and len(err.splitlines()) == 1 and "read-only" in err and "Traceback" not in err, err
    assert os.listdir(ro) == []


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmpfs, env, capsys):
    from starflow.train import checkpoint as ckpt

    out = tmpfs("3m")
    assert main(["train", "--config", env["recipe"], "--out-dir", out, "--steps", "2"]) == 0
    good = os.path.join(out, "checkpoints", "step_0000002")
    before = ckpt.verify(good)
    free = os.statvfs(out).f_bavail * os.statvfs(out).f_frsize
    with open(os.path.join(out, "filler"), "wb") as f:  # leave about 200 KB: less than one checkpoint
        f.write(b"\0" * max(0, free - 200_000))
    capsys.readouterr()
    rc = main(["train", "--config", env["recipe"], "--out-dir", out, "--steps", "4", "--resume", "auto"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert rc == 2 and len(lines) == 1 and "disk full" in lines[0] and "Traceback" not in err, err
    assert ckpt.verify(good) == before  # the previous good checkpoint is intact and loadable
    _, tensors = ckpt.load_checkpoint(good, ckpt.FULL_STEMS)
    assert set(tensors) == {"model", "ema", "optimizer"}
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["step_0000001", "step_0000002"]


def test_enospc_from_the_write_itself_is_disk_full(tmpfs, monkeypatch):
    """When the free-space estimate is wrong (or skipped), the write's own ENOSPC is still 'disk full',
    and the previous file stays in place."""
    from starflow.errors import DiskFullError
    from starflow.io import hub

    d = tmpfs("2m")
    path = os.path.join(d, "w.safetensors")
    hub.atomic_save_safetensors({"w": torch.ones(10)}, path)
    before = open(path, "rb").read()
    monkeypatch.setattr(hub, "ensure_space", lambda *a: None)
    with pytest.raises(DiskFullError, match="disk full"):
        hub.atomic_save_safetensors({"w": torch.ones(1_000_000)}, path)
    with pytest.raises(DiskFullError, match="disk full"):
        hub.atomic_write_bytes(path, b"\0" * 3_000_000)
    assert open(path, "rb").read() == before
    assert os.listdir(d) == ["w.safetensors"]
