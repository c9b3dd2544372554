"""The self-contained HTML viewer: one file, every asset inline, works offline from disk.

`render_html` fills template.html with viewer.css, viewer.js and the prepared payload
(attnpipe.visualize.prepare). The payload sits in a `<script type="application/json">` block with
`<`, `>`, `&`, U+2028 and U+2029 escaped, so a token such as `</script><img onerror=...>`
cannot end the block; the script puts token strings on the page with `textContent` only.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import matplotlib as mpl
import numpy as np

from attnpipe.visualize.outputs import write_text
from attnpipe.visualize.plots import DEFAULT_CMAP

HERE = Path(__file__).resolve().parent
# JSON escapes that keep the payload inert inside <script>: same data once JSON.parse'd.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(value: object) -> str:
    """JSON text that is safe to place between <script> tags."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return "".join(_SCRIPT_ESCAPES.get(ch, ch) for ch in text)


def colormap_table(name: str = DEFAULT_CMAP) -> list[list[int]]:
    """256 [r, g, b] entries (0-255) of a matplotlib colormap, for the matrix view."""
    rgba = mpl.colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(int).tolist()


def render_html(prepared: dict, title: str, cmap: str = DEFAULT_CMAP) -> str:
    """The viewer page for one prepared payload (see attnpipe.visualize.prepare)."""
    data = script_json({"prepared": prepared, "cmap": colormap_table(cmap)})
    pieces = {
        "{{TITLE}}": html.escape(title),
        "{{CSS}}": (HERE / "viewer.css").read_text(encoding="utf-8"),
        "{{JS}}": (HERE / "viewer.js").read_text(encoding="utf-8"),
        "{{DATA}}": data,
    }
    page = (HERE / "template.html").read_text(encoding="utf-8")
    # One pass over the placeholders, so text substituted in is never searched again.
    return "".join(pieces.get(part, part) for part in _split_placeholders(page, pieces))


def _split_placeholders(page: str, placeholders: dict[str, str]) -> list[str]:
    parts, rest = [], page
    while True:
        hits = [(rest.find(key), key) for key in placeholders if key in rest]
        if not hits:
            return parts + [rest]
        at, key = min(hits)
        parts += [rest[:at], key]
        rest = rest[at + len(key):]


def write_html(path: Path, prepared: dict, title: str, cmap: str = DEFAULT_CMAP) -> None:
    write_text(path, render_html(prepared, title, cmap))
