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
    return driver


def load(driver, path: Path) -> tuple[float, bool]:
    driver.get("about:blank")
    began = time.perf_counter()
    driver.get(path.as_uri())
    time.sleep(0.0)
    # Drawing finished: one animation frame after load.
    driver.execute_async_script("const done = arguments[0]; requestAnimationFrame(() => done());")
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
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (int(t) for t in args.tokens.split(",")):
            made = pages(Path(tmp), n)
            times: dict[str, list[float]] = {name: [] for name in made}
            drawn: dict[str, bool] = {}
            for _ in range(args.repeats):
                for name, path in made.items():
                    if path.stat().st_size > args.max_load_mb * 1e6:
                        continue
                    seconds, ok = load(driver, path)
                    times[name].append(seconds)
                    drawn[name] = ok
            for name, path in made.items():
                rows.append((n, name, path.stat().st_size / 1e6,
                             statistics.median(times[name]) if times[name] else None, drawn.get(name)))
    driver.quit()
    print("| tokens | page | size (MB) | load (s, median) | draws offline |")
    print("| --- | --- | --- | --- | --- |")
    for n, name, size, seconds, ok in rows:
        if seconds is None:
            print(f"| {n} | {name} | {size:.2f} | not opened (over --max-load-mb) | |")
        else:
            print(f"| {n} | {name} | {size:.2f} | {seconds:.2f} | {'yes' if ok else 'no'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
