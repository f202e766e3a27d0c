"""End to end: the demo server on 127.0.0.1 (a thread of this process), driven by headless Debian Chromium
through Playwright (no browser download), and a bounded burst of concurrent API requests.

The browser tests skip when /usr/bin/chromium (apt-get install chromium; $STARFLOW_CHROMIUM overrides the
path) or playwright is missing.
Screenshots go to $STARFLOW_TEST_ARTIFACTS (default: pytest's tmp dir)."""
import contextlib
import os
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

gr = pytest.importorskip("gradio")
httpx = pytest.importorskip("httpx")

sys.path.insert(0, os.path.dirname(__file__))
from app_fixtures import digits_pipe, text_pipe  # noqa: E402

from starflow import app  # noqa: E402

CHROMIUM = os.environ.get("STARFLOW_CHROMIUM", "/usr/bin/chromium")  # Debian package chromium
LOCAL = ("http://127.0.0.1", "data:", "blob:")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CountingDemo(app.Demo):
    """Records how many text requests run at once; each holds the model a little so requests overlap."""

    def __init__(self, *a, hold=0.05, **k):
        super().__init__(*a, **k)
        self.active = self.peak = self.done = 0
        self.hold = hold
        self._count = threading.Lock()

    def text_to_image(self, *a, **k):
        with self._count:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            time.sleep(self.hold)
            return super().text_to_image(*a, **k)
        finally:
            with self._count:
                self.active -= 1
                self.done += 1


@contextlib.contextmanager
def _serve(tmp_path_factory, **build_kw):
    """The app on a free 127.0.0.1 port for the duration of the block. GRADIO_TEMP_DIR stays set until the
    server is closed: Gradio checks at request time that files it gets back lie in that folder."""
    old = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    blocks = None
    try:
        demo = CountingDemo(text=text_pipe(), digits=digits_pipe())
        blocks = app.build_app(demo, **build_kw)
        port = _free_port()
        app.launch(blocks, host="127.0.0.1", port=port, block=False, quiet=True)
        yield demo, f"http://127.0.0.1:{port}"
    finally:
        if blocks is not None:
            blocks.close()
        if old is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = old


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with _serve(tmp_path_factory, concurrency=1, queue_size=32) as s:
        yield s


def _call(client, url, api, data):
    """Gradio's HTTP API: POST the inputs, then read the event stream to its end."""
    r = client.post(f"{url}/gradio_api/call/{api}", json={"data": data})
    if r.status_code != 200:
        return r.status_code, r.text
    return 200, client.get(f"{url}/gradio_api/call/{api}/{r.json()['event_id']}").text


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium chromium-driver; see .ci/install_browser.sh)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                    "--disable-background-networking", "--disable-component-update",
                                    "--no-first-run", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, server):
    """A fresh page on the app; any request that leaves 127.0.0.1 is blocked and fails the test."""
    blocked = []

    def route(r):
        if r.request.url.startswith(LOCAL):
            r.continue_()
        else:  # no network at run time
            blocked.append(r.request.url)
            r.abort()

    pg = browser.new_page(viewport={"width": 1280, "height": 1000})
    pg.route("**/*", route)
    pg.goto(server[1] + "/", wait_until="domcontentloaded", timeout=30_000)
    yield pg
    pg.close()
    assert not blocked, f"the page tried to reach the network: {blocked}"


def _artifacts(tmp_path):
    out = os.environ.get("STARFLOW_TEST_ARTIFACTS") or str(tmp_path)
    os.makedirs(out, exist_ok=True)
    return out


def test_browser_prompt_to_images(page, tmp_path):
    box = page.locator("#prompt textarea")
    box.fill("two red circles above a blue square")
    page.locator("#generate").click()
    imgs = page.locator("#gallery img")
    imgs.first.wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => { const im = document.querySelectorAll('#gallery img');"
                           " return im.length === 4 && [...im].every(i => i.complete && i.naturalWidth > 0); }",
                           timeout=30_000)
    assert imgs.count() == 4
    assert page.locator("#text-info").inner_text().startswith("4 images in")
    shot = os.path.join(_artifacts(tmp_path), "app_text_to_image.png")
    page.screenshot(path=shot, full_page=True)
    assert os.path.getsize(shot) > 10_000
    # an error is shown, not swallowed: an empty prompt
    box.fill("")
    page.locator("#generate").click()
    page.get_by_text("Please enter a prompt.").first.wait_for(timeout=15_000)
    if os.environ.get("STARFLOW_UPDATE_DOCS_SCREENSHOT"):
        docs = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images", "app.png")
        os.makedirs(os.path.dirname(docs), exist_ok=True)
        shutil.copy(shot, docs)


def test_browser_paint_mask_and_inpaint(page, tmp_path):
    """Pick an example, paint a stroke on the canvas with the mouse, inpaint: the painted layer reaches the
    handler as a mask and completions come back."""
    page.get_by_role("tab", name="Inpainting").click()
    page.get_by_label("... or pick an example").first.click()
    page.get_by_role("option").first.click()
    page.get_by_text("Paint the region to regenerate.").first.wait_for(timeout=15_000)
    page.locator("#inpaint-editor").get_by_role("button", name="Brush", exact=True).click()
    canvas = page.locator("#inpaint-editor canvas").last.bounding_box()
    x0, y0 = canvas["x"] + canvas["width"] / 2 - 60, canvas["y"] + canvas["height"] / 2
    page.mouse.move(x0, y0)
    page.mouse.down()
    for i in (1, 2, 3):
        page.mouse.move(x0 + 40 * i, y0 + 10 * i)
    page.mouse.up()
    page.get_by_role("button", name="Inpaint").click()
    page.wait_for_function("() => document.querySelectorAll('#inpaint-gallery img').length === 5", timeout=30_000)
    info = page.locator("#inpaint-info")
    assert info.inner_text().startswith("4 completions"), info.inner_text()
    page.screenshot(path=os.path.join(_artifacts(tmp_path), "app_inpainting.png"), full_page=True)


def test_burst_of_requests_queues(server):
    """8 concurrent requests all complete, and no more than the concurrency limit (1) ran at once."""
    demo, url = server
    demo.peak = demo.done = 0
    n = 8

    def one(i):
        with httpx.Client(timeout=60, trust_env=False) as c:
            return _call(c, url, "text_to_image", [f"a red circle {i}", 2, 1.0, "starflow", 1.0, i,
                                                   "jacobi" if i % 2 else "sequential"])

    with ThreadPoolExecutor(n) as ex:
        results = list(ex.map(one, range(n)))
    for status, text in results:
        assert status == 200 and text.startswith("event: complete"), text[:300]
        assert text.count('"image"') == 2
    assert demo.done == n
    assert demo.peak == 1


def test_upload_limits_over_http(server):
    """Too large: refused at upload (HTTP 413). Not an image: the request ends in an error event with a
    message, by file type (Gradio's check) or by content (the app's check); the server keeps serving."""
    demo, url = server

    def file_data(path):
        return {"path": path, "meta": {"_type": "gradio.FileData"}}

    with httpx.Client(timeout=60, trust_env=False) as c:
        r = c.post(f"{url}/gradio_api/upload", files={"files": ("big.png", b"\0" * (app.MAX_UPLOAD_BYTES + 1))})
        assert r.status_code == 413, r.text
        for name, expected in (("notes.txt", "Invalid file type"), ("fake.png", "is not an image")):
            r = c.post(f"{url}/gradio_api/upload", files={"files": (name, b"just some text")})
            assert r.status_code == 200, r.text
            status, text = _call(c, url, "encode_decode", [file_data(r.json()[0]), None, "digits", "1", ""])
            assert status == 200 and text.startswith("event: error") and expected in text, text[:300]
        status, text = _call(c, url, "digits", ["2", 1, 0.0, "starflow", 1.0, 0, "sequential"])
        assert status == 200 and text.startswith("event: complete")


def test_queue_full_is_refused_not_crashed(tmp_path_factory):
    """With room for 2 waiting requests, a burst of 8 is partly refused (HTTP 503, 'Queue is full'), the
    accepted ones complete, and the server still serves afterwards."""
    with _serve(tmp_path_factory, concurrency=1, queue_size=2) as (demo, url):
        demo.hold = 0.3

        def one(i):
            with httpx.Client(timeout=60, trust_env=False) as c:
                return _call(c, url, "text_to_image", [f"a square {i}", 1, 0.0, "starflow", 1.0, i, "sequential"])

        with ThreadPoolExecutor(8) as ex:
            results = list(ex.map(one, range(8)))
        refused = [t for s, t in results if s == 503]
        done = [t for s, t in results if s == 200]
        assert refused and all("Queue is full" in t for t in refused)
        assert done and all(t.startswith("event: complete") for t in done)
        assert len(refused) + len(done) == 8
        demo.hold = 0.0
        with httpx.Client(timeout=60, trust_env=False) as c:
            status, text = _call(c, url, "text_to_image", ["a square", 1, 0.0, "starflow", 1.0, 0, "sequential"])
        assert status == 200 and text.startswith("event: complete")
