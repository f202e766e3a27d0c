"""The web demo's handlers (limits, errors, conversions) and ``starflow serve`` (a real subprocess)."""
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "browser"))
from app_fixtures import digits_pipe, text_pipe  # noqa: E402

from starflow import app  # noqa: E402
from starflow.cli import main  # noqa: E402


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    yield app.Demo(text=text_pipe(), digits=digits_pipe())
    if old is None:
        os.environ.pop("GRADIO_TEMP_DIR", None)
    else:
        os.environ["GRADIO_TEMP_DIR"] = old


def _png(path, size=(20, 20), mode="RGB", value=128):
    Image.new(mode, size, value if mode in ("L", "1") else (value,) * len(mode)).save(path)
    return str(path)


def _down(img, side=8):
    """Undo the app's nearest-neighbour display upscale."""
    return np.asarray(img.resize((side, side), Image.NEAREST))


# ---- limits on generation requests ------------------------------------------------------------------
def test_prompt_limits():
    assert app.check_prompt("  two   red circles ") == "two red circles"
    for bad in ("", "   ", None, 3):
        with pytest.raises(gr.Error, match="enter a prompt"):
            app.check_prompt(bad)
    with pytest.raises(gr.Error, match=f"limit is {app.MAX_PROMPT_CHARS}"):
        app.check_prompt("x" * (app.MAX_PROMPT_CHARS + 1))
    assert len(app.check_prompt("x" * app.MAX_PROMPT_CHARS)) == app.MAX_PROMPT_CHARS


def test_text_to_image_limits_and_determinism(demo):
    args = dict(guidance=1.0, rule="starflow", temperature=1.0, sampler="sequential")
    for n in (0, app.MAX_IMAGES + 1, 2.5, "many"):
        with pytest.raises(gr.Error, match="Number of images"):
            demo.text_to_image("a red circle", n, seed=0, **args)
    with pytest.raises(gr.Error, match="Guidance weight"):
        demo.text_to_image("a red circle", 1, seed=0, **{**args, "guidance": -1})
    with pytest.raises(gr.Error, match="Temperature"):
        demo.text_to_image("a red circle", 1, seed=0, **{**args, "temperature": 0})
    with pytest.raises(gr.Error, match="Sampler"):
        demo.text_to_image("a red circle", 1, seed=0, **{**args, "sampler": "euler"})
    with pytest.raises(gr.Error, match="Guidance rule"):
        demo.text_to_image("a red circle", 1, seed=0, **{**args, "rule": "cfg++"})
    with pytest.raises(gr.Error, match="Seed"):
        demo.text_to_image("a red circle", 1, seed=-1, **args)
    out, info = demo.text_to_image("a red circle", 3, seed=7, **args)
    assert len(out) == 3 and "3 images" in info
    img, caption = out[0]
    assert img.size[0] >= app.DISPLAY_SIDE and img.mode == "RGB" and "seed 7" in caption
    again, _ = demo.text_to_image("a red circle", 3, seed=7, **args)
    other, _ = demo.text_to_image("a red circle", 3, seed=8, **args)
    assert all(np.array_equal(np.asarray(a[0]), np.asarray(b[0])) for a, b in zip(out, again))
    assert not np.array_equal(np.asarray(out[0][0]), np.asarray(other[0][0]))
    # jacobi decoding reaches the sequential answer (up to its threshold)
    jac, _ = demo.text_to_image("a red circle", 3, seed=7, **{**args, "sampler": "jacobi"})
    diff = max(np.abs(_down(a[0]).astype(int) - _down(b[0]).astype(int)).max() for a, b in zip(out, jac))
    assert diff <= 2


def test_progress_is_reported_per_chunk(demo):
    calls = []
    demo.text_to_image("a red circle", 9, 0.0, "starflow", 1.0, 0, "sequential",
                       progress=lambda frac, desc="": calls.append(round(frac, 3)))
    assert calls == [0.0, round(4 / 9, 3), round(8 / 9, 3), 1.0]


def test_digits_grid(demo):
    img, info = demo.digits_grid("3", 6, 1.0, "tarflow", 0.8, 1, "jacobi")
    assert isinstance(img, Image.Image) and "class 3" in info and "6 samples" in info
    with pytest.raises(gr.Error, match="Class must be between 0 and 9"):
        demo.digits_grid("10", 2)
    with pytest.raises(gr.Error, match="Number of images"):
        demo.digits_grid("1", 17)


def test_missing_model_gives_a_message(tmp_path):
    d = app.Demo(text=str(tmp_path / "not_trained_yet"), digits=None)
    assert not d.text.available and d.model_choices() == []
    with pytest.raises(gr.Error, match="does not exist"):
        d.text_to_image("a red circle", 1)
    with pytest.raises(gr.Error, match="No class-conditional"):
        d.digits_grid("1", 1)
    app.build_app(d)  # the app still builds, with "Not available" notes


# ---- uploads --------------------------------------------------------------------------------------
def test_non_image_upload_is_refused(tmp_path):
    txt = tmp_path / "notes.png"
    txt.write_text("this is not a picture")
    with pytest.raises(gr.Error, match="not an image"):
        app.load_upload(str(txt))
    with pytest.raises(gr.Error, match="not an image"):
        app.load_upload({"path": str(txt)})
    with pytest.raises(gr.Error, match="upload an image"):
        app.load_upload(None)


def test_upload_size_limits(tmp_path, monkeypatch):
    path = _png(tmp_path / "a.png", size=(64, 48))
    monkeypatch.setattr(app.inputs, "MAX_UPLOAD_BYTES", os.path.getsize(path) - 1)
    with pytest.raises(gr.Error, match="MB; the limit"):
        app.load_upload(path)
    monkeypatch.setattr(app.inputs, "MAX_UPLOAD_BYTES", 10**6)
    monkeypatch.setattr(app.inputs, "MAX_UPLOAD_PIXELS", 64 * 48 - 1)
    with pytest.raises(gr.Error, match="pixels"):
        app.load_upload(path)
    monkeypatch.setattr(app.inputs, "MAX_UPLOAD_PIXELS", 64 * 48)
    assert app.load_upload(path).size == (64, 48)


def test_conversion_to_model_size_and_mode(tmp_path):
    rgba = Image.new("RGBA", (40, 30), (255, 255, 255, 0))  # fully transparent white -> black
    x, note = app.to_model_image(rgba, (1, 8, 8))
    assert x.shape == (1, 1, 8, 8) and x.dtype == torch.uint8 and int(x.max()) == 0
    assert "transparency" in note and "centre-cropped 40x30 -> 30x30" in note and "-> 8x8" in note
    grey = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L")
    x, note = app.to_model_image(grey, (1, 8, 8))
    assert note == "Input used as is." and np.array_equal(x[0, 0].numpy(), np.asarray(grey))
    x, note = app.to_model_image(grey, (3, 16, 16))
    assert x.shape == (1, 3, 16, 16) and "L -> RGB" in note


# ---- encode -> decode ---------------------------------------------------------------------------------
def test_encode_decode_round_trip(demo, tmp_path):
    digit = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8), "L")
    src, noise, back, report = demo.encode_decode(digit, "digits", "4", "")
    assert np.array_equal(_down(src), np.asarray(digit))
    assert np.array_equal(_down(back), np.asarray(digit))  # exact inverse: the same bytes
    assert not np.array_equal(_down(noise), np.asarray(digit))
    assert "at most 0 of 255 grey levels" in report and "Bits/dim" in report and "class 4" in report
    bpd = float(report.split("**Bits/dim**: ")[1].split()[0])
    direct = demo.digits.get().bits_per_dim(torch.from_numpy(np.array(digit))[None, None].repeat(64, 1, 1, 1),
                                            torch.full((64,), 4)).mean().item()
    assert abs(bpd - direct) < 0.05  # same quantity, different dequantisation draws
    with pytest.raises(gr.Error, match="prompt"):
        demo.encode_decode(digit, "text", 0, "")
    _, _, back, report = demo.encode_decode(_png(tmp_path / "c.png", (12, 12)), "text", 0, "a blue square")
    assert "prompt 'a blue square'" in report and "resized 12x12 -> 8x8" in report
    with pytest.raises(gr.Error, match="Model must be one of"):
        demo.encode_decode(digit, "cifar", 0, "")


# ---- inpainting -----------------------------------------------------------------------------------------
def test_mask_from_strokes_and_presets():
    layer = Image.new("RGBA", (256, 256), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (0, 0, 128, 256))  # strokes over the left half
    m = app.Demo.mask_from({"layers": [layer]}, (8, 8), "painted")
    assert m[:, :4].all() and not m[:, 4:].any()
    with pytest.raises(gr.Error, match="Paint the region"):
        app.Demo.mask_from({"layers": [Image.new("RGBA", (256, 256))]}, (8, 8), "painted")
    assert app.Demo.mask_from(None, (8, 8), "bottom half")[4:].all()
    assert app.Demo.mask_from(None, (8, 8), "centre square").sum() == 16
    with pytest.raises(gr.Error, match="Mask must be one of"):
        app.Demo.mask_from(None, (8, 8), "everything")


def test_inpaint_keeps_the_unmasked_pixels(demo):
    src = Image.fromarray(np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8), "L")
    editor, note = demo.editor_value(src, "digits")
    assert editor["background"].size == (app.EDITOR_SIDE, app.EDITOR_SIDE)
    gallery, info = demo.inpaint(editor, "digits", "right half", "2", "", 3, 0, 2, 1.0)
    assert len(gallery) == 4 and "3 completions" in info and "50%" in info
    comps = [_down(im.convert("L")) for im, _ in gallery[1:]]
    for c in comps:
        assert np.array_equal(c[:, :4], np.asarray(src)[:, :4])
    assert any(not np.array_equal(c[:, 4:], np.asarray(src)[:, 4:]) for c in comps)
    with pytest.raises(gr.Error, match="Paint the region"):
        demo.inpaint(editor, "digits", "painted", "2", "", 1, 0)
    with pytest.raises(gr.Error, match="Upload an image"):
        demo.inpaint({"background": None}, "digits", "left half", "2", "", 1, 0)


def test_inpaint_not_available(demo, monkeypatch):
    monkeypatch.setattr(app.Demo, "inpaint_available", staticmethod(lambda: False))
    with pytest.raises(gr.Error, match="not available"):
        demo.inpaint({"background": Image.new("L", (8, 8))}, "digits", "left half", "1", "", 1, 0)


# ---- the app and the server ---------------------------------------------------------------------------
def test_build_app_queue_is_bounded(demo):
    blocks = app.build_app(demo, concurrency=2, queue_size=5)
    assert blocks._queue.max_size == 5
    model_fns = [fn for fn in blocks.fns.values() if fn.concurrency_id == "model"]
    assert {fn.api_name for fn in model_fns} >= {"text_to_image", "digits", "inpaint", "encode_decode"}
    assert all(fn.concurrency_limit == 2 for fn in model_fns)
    with pytest.raises(ValueError):
        app.build_app(demo, concurrency=0)


def test_serve_arguments(capsys, tmp_path):
    from starflow.cli import build_parser

    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.concurrency) == ("127.0.0.1", 7860, 1)
    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["serve", "--port", "0"]) == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_starflow_serve_subprocess(tmp_path):
    """`starflow serve` in its own process answers on 127.0.0.1 and runs a request through the queue."""
    import httpx

    model_dir = str(tmp_path / "digits")
    digits_pipe().save_pretrained(model_dir)
    port = _free_port()
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gr"), GRADIO_ANALYTICS_ENABLED="False",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", NO_PROXY="127.0.0.1,localhost")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; from starflow.cli import main; sys.exit(main())",
                             "serve", "--checkpoint", model_dir, "--port", str(port), "--threads", "1"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180  # importing gradio + torch in a fresh process is slow on a loaded 2-core box
        with httpx.Client(timeout=10, trust_env=False) as c:
            while True:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    if c.get(base + "/").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.time() < deadline, "server did not come up"
                time.sleep(0.3)
            r = c.post(f"{base}/gradio_api/call/digits", json={"data": ["5", 4, 1.0, "starflow", 1.0, 0, "sequential"]})
            r.raise_for_status()
            text = c.get(f"{base}/gradio_api/call/digits/{r.json()['event_id']}", timeout=30).text
        assert text.startswith("event: complete") and "class 5" in text, text[:500]
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0]
    assert f"http://127.0.0.1:{port}" in out
