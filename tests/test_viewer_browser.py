"""The HTML viewer in a real headless Debian chromium, opened from a file:// URL, network off.

Needs /usr/bin/chromium and /usr/bin/chromedriver (`make test` installs them when missing).
Without them the test skips locally, but fails when CI=true: CI must exercise the browser.
"""

from __future__ import annotations

import importlib.util
import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import visualize_attention
from attnpipe.store import H5Writer, Provenance, TextAttention

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
EVIL_ALERT = "</script><img src=x onerror=alert(1)>"
EVIL_TITLE = "<img src=x onerror=\"document.title='pwned';window.pwned=1\">"


def _browser_missing() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if importlib.util.find_spec("selenium") is None:
        missing.append("the selenium package")
    return ", ".join(missing) or None


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = _browser_missing()
    if missing:
        message = (f"headless browser test needs {missing}: "
                   "apt-get install -y chromium chromium-driver (make test does this)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1200,1000",
                 # network off: every host resolves to nothing and any proxy use goes nowhere
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def page(tmp_path_factory) -> Path:
    """A 2-layer, 3-head file whose heads differ clearly, with hostile tokens; its HTML view."""
    folder = tmp_path_factory.mktemp("viewer")
    tokens = ("[CLS]", EVIL_ALERT, "cat", EVIL_TITLE, "$x$", "[SEP]")
    n = len(tokens)
    attention = np.full((2, 3, n, n), 0.02, np.float32)
    for layer in range(2):
        for head in range(3):
            shift = (layer * 3 + head) % n
            attention[layer, head, np.arange(n), (np.arange(n) + shift) % n] = 0.9  # a shifted diagonal
    attention /= attention.sum(-1, keepdims=True)
    item = TextAttention(
        id="t0", text="a cat", tokens=tokens, token_ids=np.arange(n), special_tokens_mask=np.zeros(n, bool),
        offsets=np.zeros((n, 2), np.int64), word_ids=np.arange(n), truncated=False,
        num_tokens_untruncated=n, attention=attention,
    )
    meta = Provenance(
        model="synthetic", model_type="bert", weights_sha256="", weight_files=(), num_layers=2,
        num_heads=3, layers=(0, 1), heads=(0, 1, 2), dtype="float32", compute_dtype="float32",
        method="manual", max_length=n, trust_remote_code=False,
    )
    with H5Writer(folder / "a.h5", 1, "float32") as writer:
        writer.write(0, item)
        writer.finish(meta)
    out = folder / "attention_interactive.html"
    assert visualize_attention.main(["--input_file", str(folder / "a.h5"), "--mode", "html",
                                     "--output_file", str(out)]) == 0
    return out


def canvas_png(driver) -> str:
    return driver.execute_script("return document.getElementById('matrix').toDataURL('image/png');")


def select(driver, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", element_id)).select_by_value(value)


def test_viewer_draws_switches_and_runs_no_injected_code(browser, page):
    from selenium.common.exceptions import NoAlertPresentException

    browser.get(page.as_uri())
    assert browser.execute_script("return navigator.onLine") is False
    body = browser.find_element("tag name", "body")
    assert (body.get_attribute("data-layer"), body.get_attribute("data-head")) == ("0", "0")

    # The hostile tokens are text: visible as typed, no <img> created, no handler ran.
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert  # noqa: B018
    assert browser.find_elements("tag name", "img") == []
    assert browser.title != "pwned" and browser.execute_script("return window.pwned") is None

    # Line view: tokens as <text> nodes with exactly the hostile strings.
    browser.find_element("css selector", "input[name=view][value=lines]").click()
    words = [el.text for el in browser.find_elements("css selector", "#lines text[data-side=query]")]
    assert EVIL_ALERT in words and EVIL_TITLE in words
    lines_before = browser.execute_script("return document.querySelectorAll('#lines line').length")
    assert lines_before > 0
    for box in browser.find_elements("css selector", "#head-toggles input")[:3]:
        box.click()  # toggle heads 0-2 on: three heads drawn at once
    lines_all = browser.execute_script("return document.querySelectorAll('#lines line').length")
    assert lines_all > lines_before
    browser.find_element("css selector", "input[name=view][value=matrix]").click()

    # Switching layer or head changes what the matrix shows.
    first = canvas_png(browser)
    select(browser, "head", "2")
    assert body.get_attribute("data-head") == "2"
    second = canvas_png(browser)
    select(browser, "layer", "1")
    assert body.get_attribute("data-layer") == "1"
    third = canvas_png(browser)
    assert len({first, second, third}) == 3

    # Hover shows the exact stored value of the cell under the mouse.
    from selenium.webdriver.common.action_chains import ActionChains

    canvas = browser.find_element("id", "matrix")
    cell = browser.execute_script("return Math.max(4, Math.min(36, Math.floor(560 / 6)));")
    left, top = 110, 110  # LABEL in viewer.js
    ActionChains(browser).move_to_element_with_offset(
        canvas, -canvas.size["width"] // 2 + left + cell // 2, -canvas.size["height"] // 2 + top + cell // 2
    ).perform()
    tooltip = browser.find_element("id", "tooltip").text
    assert tooltip.startswith("query 0 [CLS]") and "key 0 [CLS]" in tooltip and "attention = 0." in tooltip

    # A screenshot of the page is not blank.
    shot = np.asarray(Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB"), dtype=np.int16)
    assert shot.std() > 20 and np.any(shot < 200, axis=-1).mean() > 0.05

    # Nothing ran from the tokens at any point.
    assert browser.title != "pwned" and browser.find_elements("tag name", "img") == []
    logs = browser.get_log("browser")
    assert not [entry for entry in logs if entry["level"] == "SEVERE"], logs
