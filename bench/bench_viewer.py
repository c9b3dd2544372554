#!/usr/bin/env python3
"""attnpipe's HTML viewer next to BertViz and CircuitsVis: file size, load time, offline rendering.

For a 30-, 120- and 512-token text of MiniLM's shape (6 layers x 12 heads, random attention with
a peak per row), the script writes attnpipe's page (visualize_attention.py --mode html, default
budget), BertViz's head and model views (html_action="return") and CircuitsVis's attention_heads
(its inline, offline variant), opens each in headless chromium with the network off, --repeats
rounds interleaved, and reports the file size, the median time to the load event plus drawing, and
whether the page drew anything (visible elements, a non-blank screenshot). BertViz and
CircuitsVis are not requirements of attnpipe: install them beside it to run this
(pip install --target DIR bertviz circuitsvis ipython importlib_metadata; PYTHONPATH=DIR).

    PYTHONPATH=/tmp/cmp python bench/bench_viewer.py --repeats 3
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import visualize_attention  # noqa: E402
from attnpipe.store import H5Writer  # noqa: E402
from test_viewer_browser import provenance, text_item  # noqa: E402

LAYERS, HEADS = 6, 12
LOAD_TIMEOUT = 60  # seconds; a page slower than this is reported as such


def attention(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    values = rng.random((LAYERS, HEADS, n, n), dtype=np.float32) ** 8
    return values / values.sum(-1, keepdims=True)


def pages(folder: Path, n: int) -> dict[str, Path]:
    tokens = ["[CLS]"] + [f"w{i}" for i in range(n - 2)] + ["[SEP]"]
    att = attention(n)
    with H5Writer(folder / f"t{n}.h5", 1, "float32") as writer:
        writer.write(0, text_item(tokens, att))
        writer.finish(provenance(LAYERS, HEADS, n))
    out = {"attnpipe": folder / f"attnpipe_{n}.html"}
    visualize_attention.main(["-i", str(folder / f"t{n}.h5"), "--mode", "html", "-o", str(out["attnpipe"])])
    try:
        import torch
        from bertviz import head_view, model_view

        layers = [torch.from_numpy(att[i][None]) for i in range(LAYERS)]  # (1, head, query, key) per layer
        for name, view in (("bertviz head", head_view), ("bertviz model", model_view)):
            path = folder / f"{name.replace(' ', '_')}_{n}.html"
            path.write_text("<!DOCTYPE html><meta charset=utf-8>" + view(layers, tokens, html_action="return").data)
            out[name] = path
    except ImportError as err:
        print(f"BertViz not measured: {err}", file=sys.stderr)
    try:
        from circuitsvis.attention import attention_heads

        html = attention_heads(att[-1], tokens)  # one layer: CircuitsVis shows one layer's heads
        path = folder / f"circuitsvis_{n}.html"
        path.write_text("<!DOCTYPE html><meta charset=utf-8>" + html.local_src)
        out["circuitsvis (1 layer)"] = path
    except ImportError as err:
        print(f"CircuitsVis not measured: {err}", file=sys.stderr)
    return out


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000",
                 "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    driver.set_network_conditions(offline=True, latency=0, download_throughput=0, upload_throughput=0)
    driver.set_page_load_timeout(LOAD_TIMEOUT)
    driver.set_script_timeout(LOAD_TIMEOUT)
    return driver


def load(driver, path: Path) -> tuple[float | None, bool]:
    """Seconds to the load event plus one frame (None: over the page-load timeout), and drawn."""
    from selenium.common.exceptions import TimeoutException

    driver.get("about:blank")
    began = time.perf_counter()
    try:
        driver.get(path.as_uri())
        # Drawing finished: one animation frame after load.
        driver.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => done());")
    except TimeoutException:
        return None, False
    seconds = time.perf_counter() - began
    shot = np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("L"), dtype=np.int16)
    drawn = bool((shot < 200).mean() > 0.01)
    return seconds, drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", default="30,120,512", help="text lengths (default 30,120,512)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--max-load-mb", type=float, default=200.0,
                        help="larger pages are sized but not opened (BertViz at 512 tokens: ~870 MB)")
    args = parser.parse_args(argv)
    driver = browser()
    print("| tokens | page | size (MB) | load (s, median) | draws offline |")
    print("| --- | --- | --- | --- | --- |", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(t) for t in args.tokens.split(",")):
            made = pages(Path(tmp), n)
            times: dict[str, list[float | None]] = {name: [] for name in made}
            drawn: dict[str, bool] = {}
            for _ in range(args.repeats):
                for name, path in made.items():
                    if path.stat().st_size > args.max_load_mb * 1e6 or None in times[name]:
                        continue  # too big to open, or already over the timeout once
                    seconds, ok = load(driver, path)
                    times[name].append(seconds)
                    drawn[name] = ok
            for name, path in made.items():
                size = path.stat().st_size / 1e6
                if not times[name]:
                    cell, ok = "not opened (over --max-load-mb)", ""
                elif None in times[name]:
                    cell, ok = f"over {LOAD_TIMEOUT} s", "no"
                else:
                    cell, ok = f"{statistics.median(times[name]):.2f}", "yes" if drawn[name] else "no"
                print(f"| {n} | {name} | {size:.2f} | {cell} | {ok} |", flush=True)
    driver.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
