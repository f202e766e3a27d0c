"""The demo's two resource limits: the inpainting editor's background obeys the pixel limit before any
work, and uploads kept on disk are bounded in total (and in age)."""
import os
import sys
import time

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "browser"))
from app_fixtures import digits_pipe  # noqa: E402

from starflow import app  # noqa: E402
from starflow.app import inputs  # noqa: E402
from test_bad_input_table import bomb_png  # noqa: E402


@pytest.fixture
def upload_dir(tmp_path, monkeypatch):
    d = tmp_path / "gradio"
    d.mkdir()
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(d))
    return d


@pytest.fixture(scope="module")
def demo():
    return app.Demo(digits=digits_pipe())


def _no_inpainting(monkeypatch):
    import starflow.tasks.inpaint as inpaint_module

    def refuse(*a, **k):
        raise AssertionError("the model ran on an image over the pixel limit")
    monkeypatch.setattr(inpaint_module, "inpaint", refuse)


def test_oversize_editor_background_is_refused_before_any_work(demo, monkeypatch):
    _no_inpainting(monkeypatch)
    big = Image.new("L", (4200, 4200))  # 17.6 M pixels > MAX_UPLOAD_PIXELS
    with pytest.raises(gr.Error, match="4200x4200; the limit is 16,777,216 pixels"):
        demo.inpaint({"background": big, "layers": [], "composite": big}, "digits", "left half", "1", "", 1, 0)


def test_oversize_editor_background_file_is_refused_from_its_header(demo, monkeypatch, upload_dir):
    """The 164 KB, 13000x13000 PNG of the report: refused from its header, never decoded."""
    _no_inpainting(monkeypatch)
    path = bomb_png(str(upload_dir / "huge.png"), side=13000)
    with pytest.raises(Image.DecompressionBombError):  # what Gradio's own decode of the editor value meets
        Image.open(path)
    with pytest.raises(gr.Error, match="not an image this app can read|limit is"):
        demo.inpaint({"background": path, "layers": []}, "digits", "left half", "1", "", 1, 0)


def test_uploads_on_disk_are_bounded_in_total_and_age(upload_dir):
    chunk = os.urandom(4 * 1024 * 1024)
    for i in range(25):  # 25 x 4 MB uploads, as in the report, each in its own Gradio-style folder
        sub = upload_dir / f"u{i:02d}"
        sub.mkdir()
        (sub / "blob.png").write_bytes(chunk)
        os.utime(sub / "blob.png", (time.time() - 100 + i, time.time() - 100 + i))
    stale = upload_dir / "stale.png"
    stale.write_bytes(b"x" * 10)
    os.utime(stale, (time.time() - 2 * inputs.MAX_UPLOAD_AGE_S,) * 2)
    current = upload_dir / "current"
    current.mkdir()
    Image.new("L", (8, 8)).save(current / "digit.png")
    os.utime(current / "digit.png", (time.time() - 1000,) * 2)  # the oldest file, but the one being handled
    img = inputs.load_upload(str(current / "digit.png"))
    assert img.size == (8, 8)
    total = sum(f.stat().st_size for f in upload_dir.rglob("*") if f.is_file())
    assert total <= inputs.MAX_UPLOAD_TOTAL_BYTES
    assert (current / "digit.png").exists() and not stale.exists()
    assert (upload_dir / "u24" / "blob.png").exists() and not (upload_dir / "u00").exists()  # oldest went first
