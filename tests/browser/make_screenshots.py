"""Screenshots of the demo for the README: ``python tests/browser/make_screenshots.py [--checkpoint DIR]
[--text-checkpoint DIR] [--out docs/images]``. Starts the app on 127.0.0.1 (default: the shipped models),
drives Debian's Chromium through each available tab and writes ``app.png`` (the first available of the
text and digits tabs) plus ``app_<tab>.png``. Not a test; needs /usr/bin/chromium and playwright."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile

import torch


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoint")
    ap.add_argument("--text-checkpoint")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "..", "docs", "images"))
    ap.add_argument("--prompt", default="two red circles above a blue square")
    ap.add_argument("--digit", default="7")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from starflow import app
    from starflow.cli.serve import resolve_checkpoints

    app.offline_env(tempfile.mkdtemp(prefix="starflow-shots-"))
    from playwright.sync_api import sync_playwright

    ck, tck = resolve_checkpoints(args.checkpoint, args.text_checkpoint)
    demo = app.Demo.from_dirs(ck, tck)
    blocks = app.build_app(demo)
    port = _free_port()
    app.launch(blocks, port=port, block=False, quiet=True)
    url = f"http://127.0.0.1:{port}/"
    os.makedirs(args.out, exist_ok=True)
    written = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(("http://127.0.0.1", "data:", "blob:"))
                   else r.abort())
        page.goto(url, wait_until="domcontentloaded")

        def shot(name):
            path = os.path.join(args.out, f"app_{name}.png")
            page.screenshot(path=path, full_page=True)
            written.append(path)

        if demo.text.available:
            page.locator("#prompt textarea").fill(args.prompt)
            page.locator("#generate").click()
            page.wait_for_function("() => document.querySelectorAll('#gallery img').length >= 4", timeout=300_000)
            page.wait_for_timeout(500)
            shot("text_to_image")
        if demo.digits.available:
            page.get_by_role("tab", name="Digits").click()
            page.get_by_label("Class (digit)").first.click()
            page.get_by_role("option", name=args.digit, exact=True).click()
            page.locator("#generate-digits").click()
            page.wait_for_selector("#digits-grid img", timeout=300_000)
            page.wait_for_timeout(500)
            shot("digits")
        if demo.inpaint_available():
            page.get_by_role("tab", name="Inpainting").click()
            page.get_by_label("... or pick an example").first.click()
            page.get_by_role("option").nth(1).click()
            page.get_by_text("Paint the region to regenerate.").first.wait_for(timeout=60_000)
            page.locator("#inpaint-editor").get_by_role("button", name="Brush", exact=True).click()
            box = page.locator("#inpaint-editor canvas").last.bounding_box()
            x0, y0 = box["x"] + box["width"] / 2 - 70, box["y"] + box["height"] / 2 + 20
            page.mouse.move(x0, y0)
            page.mouse.down()
            for i in (1, 2, 3, 4):
                page.mouse.move(x0 + 35 * i, y0 + 5 * i)
            page.mouse.up()
            page.get_by_label("Class (class models)").first.click()
            page.get_by_role("option", name="3", exact=True).click()
            page.get_by_role("button", name="Inpaint").click()
            page.wait_for_function("() => document.querySelectorAll('#inpaint-gallery img').length >= 2",
                                   timeout=300_000)
            page.wait_for_timeout(500)
            shot("inpainting")
        page.get_by_role("tab", name="Encode → decode").click()
        page.get_by_label("... or pick an example").last.click()
        page.get_by_role("option").first.click()
        page.locator("#encode-go").click()
        page.get_by_text("Round trip").first.wait_for(timeout=300_000)
        page.wait_for_timeout(500)
        shot("encode_decode")
        browser.close()
    blocks.close()
    import shutil

    main_shot = written[0]
    shutil.copy(main_shot, os.path.join(args.out, "app.png"))
    print("\n".join(written + [os.path.join(args.out, "app.png") + f" (copy of {os.path.basename(main_shot)})"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
