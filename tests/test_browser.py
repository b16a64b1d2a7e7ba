"""A real browser (Debian's Chromium, headless, driven by Playwright) uploads a photo on / and reads the label."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_serve_http import start_server, stop_server

CHROMIUM = os.environ.get("LESIONLAB_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing on CI (apt-get install chromium)")
        pytest.skip(f"needs Chromium at {CHROMIUM} (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(onnx_run):
    proc, port = start_server(onnx_run, "--threads", "1")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def test_upload_on_the_page_shows_label_probability_and_disclaimer(browser, server, small_data):
    photo = sorted((small_data / "test" / "malignant").iterdir())[0]
    page = browser.new_page()
    external: list[str] = []
    page.on("request", lambda r: None if r.url.startswith((server, "data:", "blob:")) else external.append(r.url))
    page.goto(server + "/")
    assert "not a diagnosis" in page.inner_text("#disclaimer")
    page.set_input_files("#file", str(photo))
    page.wait_for_function(
        "['benign', 'malignant', 'not a lesion'].includes(document.querySelector('[data-testid=label]').textContent)",
        timeout=30_000,
    )
    label = page.inner_text("[data-testid=label]")
    if label != "not a lesion":
        assert label in ("benign", "malignant")
        assert "P(malignant) =" in page.inner_text("[data-testid=probability]")
    assert "not a diagnosis" in page.inner_text("#result")
    assert external == []  # the page fetched nothing from the internet
    page.close()


def test_page_reports_a_bad_file(browser, server, image_files):
    page = browser.new_page()
    page.goto(server + "/")
    page.set_input_files("#file", str(image_files["text"]))
    page.wait_for_function("document.querySelector('[data-testid=label]').textContent === 'error'", timeout=30_000)
    assert "not an image" in page.inner_text("[data-testid=error]")
    page.close()
