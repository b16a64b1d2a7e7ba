"""A real browser (Debian's Chromium, headless, driven by Playwright) uploads a photo on / and reads the label;
at a desktop and a phone width, no two of the page's boxes overlap and none clips its text."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from urllib.parse import urlparse

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


# ------------------------------------------------------------------ layout at desktop and phone widths

DIAGNOSES = {  # taxonomy codes, unsorted; one unknown code (shown as it is) long enough to wrap on a phone
    "nv": 0.17,
    "mel": 0.62,
    "bkl": 0.05,
    "bcc": 0.1,
    "pigmented_actinic_keratosis_with_intraepithelial_carcinoma": 0.06,
}
MALIGNANT = ["mel", "bcc", "pigmented_actinic_keratosis_with_intraepithelial_carcinoma"]
EXTERNAL = {  # the shape of GET /v1/model's "external" (model_card.external_results)
    "ham10000-vienna-dermatology-department": {
        "n": 1200,
        "n_malignant": 240,
        "threshold": 0.3125,
        "auc": {"value": 0.8123, "ci95": [0.7844, 0.8391]},
        "sensitivity": {"value": 0.9, "ci95": [0.8571, 0.9375]},
        "specificity": {"value": 0.5521, "ci95": [0.5201, 0.5843]},
    },
    "pad-ufes-20-smartphone": {
        "n": 310,
        "n_malignant": 0,
        "threshold": 0.3125,
        "auc": None,
        "sensitivity": None,
        "specificity": {"value": 0.7194, "ci95": [0.6657, 0.7688]},
        "note": "single-class set (only benign images): AUC and sensitivity are undefined",
    },
}
PREDICTION = {  # a /v1/predict answer of a model with a diagnosis head
    "label": "malignant",
    "probability": 0.7342,
    "threshold": 0.3125,
    "refused": False,
    "reason": None,
    "ood_score": 1.7,
    "model_id": "isic-kaggle-efficientnet_lite0-finetune-diagnoses-20250101T000000Z",
    "model_version": "5f3e9a1b2c4d",
    "inference_ms": 41.27,
    "tta": False,
    "explanation_png": None,
    "disclaimer": "Screening aid, not a diagnosis.",
    "diagnoses": DIAGNOSES,
}

# Boxes are the page's [data-box] blocks. Two visible boxes (neither inside the other) must not intersect; every
# box and every element of it holding text must show all of its content (scrollWidth within clientWidth), and
# every visible element must lie inside the viewport's width.
LAYOUT_JS = """() => {
  const vw = document.documentElement.clientWidth;
  const shown = (el) => {
    const r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden";
  };
  const name = (el) => el.dataset.box;
  const where = (el) => `${el.tagName.toLowerCase()}${el.id ? "#" + el.id : ""} in ${name(el.closest("[data-box]"))}`;
  const boxes = [...document.querySelectorAll("[data-box]")].filter(shown);
  const problems = [];
  boxes.forEach((a, i) => boxes.slice(i + 1).forEach((b) => {
    if (a.contains(b) || b.contains(a)) return;
    const p = a.getBoundingClientRect(), q = b.getBoundingClientRect();
    const x = Math.min(p.right, q.right) - Math.max(p.left, q.left);
    const y = Math.min(p.bottom, q.bottom) - Math.max(p.top, q.top);
    if (x > 0.5 && y > 0.5) problems.push(`${name(a)} overlaps ${name(b)} by ${x.toFixed(0)}x${y.toFixed(0)} px`);
  }));
  for (const box of boxes) {
    for (const el of [box, ...box.querySelectorAll("*")]) {
      if (!shown(el)) continue;
      const r = el.getBoundingClientRect();
      if (r.left < -0.5 || r.right > vw + 0.5) {
        problems.push(`${where(el)} leaves the viewport (${r.left.toFixed(0)}..${r.right.toFixed(0)} of ${vw} px)`);
      }
      const text = el === box || [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
      if (text && el.scrollWidth > el.clientWidth + 1) {
        problems.push(`${where(el)} clips its text (scrollWidth ${el.scrollWidth} > clientWidth ${el.clientWidth})`);
      }
    }
  }
  const page = document.documentElement.scrollWidth;
  if (page > vw + 1) problems.push(`the page scrolls sideways (${page} > ${vw} px)`);
  return {boxes: boxes.map(name), problems};
}"""

# WCAG AA: every text in a box at least 4.5:1 against the first opaque background behind it.
CONTRAST_JS = """() => {
  const rgba = (s) => (s.match(/[\\d.]+/g) || []).map(Number);
  const lum = (c) => {
    const [r, g, b] = c.slice(0, 3).map((v) => (v /= 255) <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4);
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const behind = (el) => {
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c.length === 3 || c[3] === 1) return c;
    }
    return [255, 255, 255];
  };
  const low = [];
  for (const el of document.querySelectorAll("[data-box], [data-box] *")) {
    const text = [...el.childNodes].some((n) => n.nodeType === Node.TEXT_NODE && n.textContent.trim());
    if (!text || !el.getClientRects().length) continue;
    const [a, b] = [lum(rgba(getComputedStyle(el).color)), lum(behind(el))];
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) low.push(`"${el.textContent.trim().slice(0, 30)}" ${ratio.toFixed(2)}:1`);
  }
  return low;
}"""


def _mock_api(page, external: dict | None, prediction: dict | None = None) -> None:
    """/v1/model answers the real card with ``external`` set (and, with a ``prediction``, the malignant diagnoses);
    /v1/predict answers ``prediction`` (None: the real model)."""

    def card(route):
        response = route.fetch()
        extra = {"malignant_diagnoses": MALIGNANT} if prediction is not None else {}
        route.fulfill(response=response, json={**response.json(), "external": external, **extra})

    page.route(lambda url: urlparse(url).path == "/v1/model", card)
    if prediction is not None:
        page.route(lambda url: urlparse(url).path == "/v1/predict", lambda route: route.fulfill(json=prediction))


@pytest.mark.parametrize(("width", "height"), [(1200, 900), (390, 844)], ids=["desktop", "phone"])
def test_layout_has_no_overlapping_or_clipped_boxes(browser, server, small_data, width, height):
    photo = sorted((small_data / "test" / "malignant").iterdir())[0]
    page = browser.new_page(viewport={"width": width, "height": height})
    _mock_api(page, EXTERNAL, PREDICTION)
    page.goto(server + "/", wait_until="networkidle")
    loaded = page.evaluate(LAYOUT_JS)
    page.set_input_files("#file", str(photo))
    page.wait_for_function("document.querySelector('[data-testid=label]').textContent === 'malignant'")
    shown = page.evaluate(LAYOUT_JS)
    assert loaded["problems"] == [] and shown["problems"] == [], (loaded["problems"], shown["problems"])
    assert {"header", "disclaimer", "upload", "external"} <= set(loaded["boxes"]), loaded
    assert {"header", "disclaimer", "upload", "result", "diagnoses", "external"} <= set(shown["boxes"]), shown
    assert page.evaluate(CONTRAST_JS) == []
    for _ in range(6):  # the file picker is the first thing the keyboard reaches
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "file":
            break
    else:
        pytest.fail("the file input cannot be reached with Tab")

    names = page.locator("[data-box=diagnoses] li .dx-name").all_inner_texts()
    assert names == [  # most likely first, in words where the code is the default taxonomy's
        "melanoma mel · malignant",
        "melanocytic nevus nv",
        "basal cell carcinoma bcc · malignant",
        "pigmented actinic keratosis with intraepithelial carcinoma malignant",
        "benign keratosis bkl",
    ]
    assert page.locator("[data-box=diagnoses] li .dx-pct").all_inner_texts()[:2] == ["62.0%", "17.0%"]
    table = page.inner_text("[data-box=external]")
    assert "How it does on other clinics' images" in table and "ham10000-vienna-dermatology-department" in table
    assert "0.81 (0.78–0.84)" in table and "90% (86–94%)" in table and "AUC and sensitivity are undefined" in table
    assert "not a diagnosis" in page.inner_text("[data-box=disclaimer]")
    page.close()


def test_binary_model_and_no_external_results_show_nothing_extra(browser, server, small_data):
    photo = sorted((small_data / "test" / "benign").iterdir())[0]
    page = browser.new_page(viewport={"width": 390, "height": 844})
    _mock_api(page, None)
    page.goto(server + "/", wait_until="networkidle")
    page.set_input_files("#file", str(photo))
    page.wait_for_function(
        "['benign', 'malignant', 'not a lesion'].includes(document.querySelector('[data-testid=label]').textContent)",
        timeout=30_000,
    )
    assert not page.is_visible("[data-box=diagnoses]")  # the real (binary) model sends no diagnoses
    assert "not been evaluated on other clinics' images" in page.inner_text("[data-box=external]")
    assert page.evaluate(LAYOUT_JS)["problems"] == []
    page.close()
