"""The live page in a real headless browser: Debian's chromium driven by Playwright (never a
browser Playwright downloads). Types a prompt, starts, sees frames drawn on the canvas, switches
the prompt; saves a screenshot in the test's tmp folder. In CI (CI=true) a missing chromium
fails the test (.ci/run installs it); elsewhere it skips saying so."""
import os
import shutil

import numpy as np
import pytest

from serve_util import Server

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


def _need_chromium():
    if os.path.exists(CHROMIUM) and shutil.which("chromium"):
        return
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing; .ci/run installs Debian's chromium package (apt-get install -y chromium)")
    pytest.skip(f"{CHROMIUM} is missing (apt-get install -y chromium); CI installs it and runs this test")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server") / "server.log", "--max-streams", "2")
    yield s
    s.stop()


@pytest.mark.slow  # chromium and a server (~15 s with its setup)
def test_page_streams_frames_in_a_real_browser(server, tmp_path):
    _need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(server.url + "/")
            page.wait_for_function("document.getElementById('screen').width > 0")
            blank = page.evaluate("Array.from(document.getElementById('screen').getContext('2d')"
                                  ".getImageData(0, 0, 8, 8).data)")
            page.fill("#prompt", "a green circle moving up on a white background")
            page.select_option("#steps", "2")
            page.click("#start")
            page.wait_for_function("Number(document.body.dataset.framesDrawn) >= 12", timeout=120_000)
            page.fill("#next", "a blue square moving left on a white background")
            page.click("#switch")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('now: a blue square')",
                                   timeout=120_000)
            page.screenshot(path=str(tmp_path / "page.png"))
            figures = {k: page.inner_text(f"#{k}") for k in ("fps", "ttff", "latency", "count")}
            pixels = np.array(page.evaluate(
                "Array.from(document.getElementById('screen').getContext('2d').getImageData(0, 0, "
                "document.getElementById('screen').width, document.getElementById('screen').height).data)"))
            page.click("#stop")
            page.wait_for_function("document.getElementById('status').textContent.startsWith('ended')",
                                   timeout=60_000)
        finally:
            browser.close()
    assert not errors, errors
    assert (tmp_path / "page.png").stat().st_size > 1000
    assert all(v != "-" for v in figures.values()), figures
    assert figures["ttff"].endswith(" s") and figures["latency"].endswith(" ms")
    assert np.array(blank).max() == 0 and pixels.reshape(-1, 4)[:, :3].std() > 1, "no frame was drawn"
    server.wait_active(0)
