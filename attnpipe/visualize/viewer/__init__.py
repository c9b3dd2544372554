"""The self-contained HTML viewer: one file, every asset inline, works offline from disk.

`page_data` packs one text's attention into what the page reads: one *panel* per kind of
attention (encoder/self, decoder, cross for encoder-decoder files), each with its row (query) and
column (key) tokens, its model layer/head indices and one base64 string per (layer, head). The
matrices are encoded as compactly as the byte budget needs, finest first:

    f32  little-endian float32, the stored values exactly
    u16  round(p * 65535), exact to 1/131070
    u8   round(p * 255), exact to 1/510 (a 512-token MiniLM text: 72 heads in ~25 MB)

The page decodes a head only when it is shown (and keeps a few decoded heads), so a 512-token
page opens as fast as a short one. `render_html` fills template.html with viewer.css, viewer.js
and that data. The data sits in a `<script type="application/json">` block with `<`, `>`, `&`,
U+2028 and U+2029 escaped, so a token such as `</script><img onerror=...>` cannot end the block;
the script puts token strings on the page with `textContent` / canvas `fillText` only.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.visualize.outputs import write_text
from attnpipe.visualize.plots import DEFAULT_CMAP

HERE = Path(__file__).resolve().parent
# JSON escapes that keep the payload inert inside <script>: same data once JSON.parse'd.
_SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
# Encodings, finest first: bytes per value and the largest code (None: float32 as is).
ENCODINGS = {"f32": (4, None), "u16": (2, 65535), "u8": (1, 255)}
PAGE_OVERHEAD = 40_000  # bytes of HTML, CSS and script around the data (measured: ~30 kB)


@dataclass(frozen=True)
class Panel:
    """One kind of attention of one text, as the page shows it."""

    kind: str  # "self" (an encoder or decoder-only model), "encoder", "decoder" or "cross"
    label: str  # shown in the page's attention menu
    rows: tuple[str, ...]  # query tokens
    cols: tuple[str, ...]  # key tokens (the rows' for self-attention)
    layers: tuple[int, ...]  # model indices of attention's first axis
    heads: tuple[int, ...]  # model indices of attention's second axis
    attention: np.ndarray  # (layer, head, query, key)
    special: tuple[bool, ...] = ()  # per row token: a special token ([CLS], <s>, ...)
    generated: tuple[bool, ...] = ()  # per row token: produced by the model (marked on the page)


@dataclass(frozen=True)
class PageData:
    data: dict  # what the page's JSON block holds
    num_bytes: int
    encoding: str
    kept: tuple[tuple[str, int, int], ...]  # (kind, layer_idx, head_idx) on the page
    dropped: tuple[tuple[str, int, int], ...]  # trimmed to fit the budget (--trim)


def script_json(value: object) -> str:
    """JSON text that is safe to place between <script> tags."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for ch, escape in _SCRIPT_ESCAPES.items():  # str.replace: fast on the 25 MB of a 512-token page
        text = text.replace(ch, escape)
    return text


def colormap_table(name: str = DEFAULT_CMAP) -> list[list[int]]:
    """256 [r, g, b] entries (0-255) of a matplotlib colormap, for the page's colours."""
    rgba = mpl.colormaps[name](np.linspace(0.0, 1.0, 256))
    return np.round(rgba[:, :3] * 255).astype(int).tolist()


def encode(matrix: np.ndarray, encoding: str) -> str:
    """One (query, key) matrix as base64 of its row-major values in `encoding`."""
    _, top = ENCODINGS[encoding]
    values = np.asarray(matrix, dtype=np.float32)
    if top is None:
        raw = values.astype("<f4").tobytes()
    else:
        raw = np.round(np.clip(values, 0.0, 1.0) * top).astype("<u2" if top > 255 else "u1").tobytes()
    return base64.b64encode(raw).decode("ascii")


def decode(text: str, encoding: str, shape: tuple[int, int]) -> np.ndarray:
    """The inverse of `encode` (what viewer.js does), for tests and notebooks."""
    _, top = ENCODINGS[encoding]
    raw = base64.b64decode(text)
    if top is None:
        return np.frombuffer(raw, "<f4").reshape(shape)
    return (np.frombuffer(raw, "<u2" if top > 255 else "u1").astype(np.float32) / top).reshape(shape)


def _b64_len(num_bytes: int) -> int:
    return 4 * ((num_bytes + 2) // 3)


def page_data(panels: Sequence[Panel], *, title: str, text: str, start: str, cmap: str = DEFAULT_CMAP,
              decimals: int | None = None, max_bytes: int | None = None, trim: bool = False) -> PageData:
    """Pack `panels` for the page with the finest encoding whose page fits `max_bytes`.

    Over the budget even as u8: raise, or with `trim` keep the (kind, layer, head) matrices in
    order while they fit. `decimals` rounds the values first (then f32 stores the rounded values).
    """
    if decimals is not None and not 0 <= decimals <= 10:
        raise AttnpipeError(f"--decimals {decimals} is out of range: use 0-10")
    envelope = {"title": title, "text": text, "cmap": colormap_table(cmap), "start": start,
                "panels": [{"kind": p.kind, "label": p.label, "rows": list(p.rows), "cols": list(p.cols),
                            "special": list(p.special), "generated": list(p.generated),
                            "layers": list(p.layers), "heads": list(p.heads)} for p in panels]}
    fixed = len(script_json(envelope).encode()) + PAGE_OVERHEAD
    matrices = [(panel, li, hi) for panel in panels
                for li in range(len(panel.layers)) for hi in range(len(panel.heads))]
    cells = [len(p.rows) * len(p.cols) for p, _, _ in matrices]

    def cost(encoding: str, count: int) -> int:  # base64 text + quotes and commas per matrix
        return sum(_b64_len(c * ENCODINGS[encoding][0]) + 3 for c in cells[:count]) + 16 * len(panels)

    budget = None if max_bytes is None else max_bytes - fixed
    encoding = next((e for e in ENCODINGS if budget is None or cost(e, len(cells)) <= budget), None)
    count = len(matrices)
    if encoding is None:
        total = (fixed + cost("u8", len(cells))) / 1e6
        if not trim:
            raise AttnpipeError(
                f"the page would be about {total:.1f} MB even at 1 byte per value, over --max-bytes "
                f"{max_bytes} ({len(matrices)} heads of {' / '.join(f'{len(p.rows)} x {len(p.cols)}' for p in panels)}"
                " tokens): choose fewer --layers/--heads, raise --max-bytes, or pass --trim to keep what fits")
        encoding = "u8"
        count = max((k for k in range(len(cells) + 1) if cost("u8", k) <= budget), default=0)
        if count == 0:
            raise AttnpipeError(f"--max-bytes {max_bytes} cannot hold even one head "
                                f"({len(matrices[0][0].rows)} x {len(matrices[0][0].cols)} tokens)")
    kept = matrices[:count]
    for panel, entry in zip(panels, envelope["panels"]):
        data: list[list[str]] = [[] for _ in panel.layers]
        for p, li, hi in kept:
            if p is panel:
                matrix = panel.attention[li, hi]
                if decimals is not None:
                    matrix = np.round(matrix.astype(np.float64), decimals)
                data[li].append(encode(matrix, encoding))
        # A trimmed page lists only the heads it holds: whole layers first, then a partial one.
        entry["data"] = [row for row in data if row]
        entry["layers"] = [layer for layer, row in zip(panel.layers, data) if row]
    envelope["panels"] = [e for e in envelope["panels"] if e["data"]]
    envelope["encoding"] = encoding
    body = script_json(envelope)
    describe = [(p.kind, p.layers[li], p.heads[hi]) for p, li, hi in matrices]
    return PageData(data=envelope, num_bytes=len(body.encode()) + PAGE_OVERHEAD, encoding=encoding,
                    kept=tuple(describe[:count]), dropped=tuple(describe[count:]))


def render_html(data: dict) -> str:
    """The viewer page for one `page_data(...).data`."""
    pieces = {
        "{{TITLE}}": html.escape(data["title"]),
        "{{CSS}}": (HERE / "viewer.css").read_text(encoding="utf-8"),
        "{{JS}}": (HERE / "viewer.js").read_text(encoding="utf-8"),
        "{{DATA}}": script_json(data),
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


def write_html(path: Path, data: dict) -> None:
    write_text(path, render_html(data))
