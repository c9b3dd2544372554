"""Matplotlib figures of attention. Rows are queries, columns are keys, always.

The drawing functions (`heatmap`, `colorbar`, `head_grid`, `model_view`) draw on Axes they are
given and return them. The figure builders at the bottom (`head_figure`, ...) are what
visualize_attention.py calls: they create a `Figure` (no pyplot, no global state) and lay it out.
`save_figure` writes PNG/SVG/PDF atomically and byte-for-byte reproducibly; `save_drawing` makes,
fills (through a drawing function on its Axes) and saves the one-Axes figures of the analyses.

Token strings are drawn literally: mathtext is switched off, so `$x$` or `\\frac` is text;
control characters (NUL, ...) are drawn as their Unicode control pictures (`label`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnpipe.visualize.outputs import atomic_path

# A token such as "$\frac$" makes savefig raise when parsed as mathtext: draw strings literally.
mpl.rcParams["text.parse_math"] = False
# SVG element ids are hashed from this salt (default: random per run); fixed -> identical files.
mpl.rcParams["svg.hashsalt"] = "attnpipe"

DEFAULT_CMAP = "viridis"  # perceptually uniform, readable in greyscale and by colour-blind readers
MAX_LABELS = 60  # more tokens than this on an axis: label every k-th one (stated on the figure)
GRID_MAX_LABELS = 16  # per-head panels of a grid carry token labels only up to this length
# Dates are the only thing that varies between two saves of the same figure.
SAVE_METADATA = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


@dataclass(frozen=True)
class View:
    """What one figure shows: the token window and the label step, for the note on the figure."""

    tokens: tuple[str, ...]  # labels of the shown tokens
    total: int  # tokens in the text
    label_step: int

    @property
    def note(self) -> str:
        parts = []
        if len(self.tokens) < self.total:
            parts.append(f"first {len(self.tokens)} of {self.total} tokens shown (--max-tokens)")
        if self.label_step > 1:
            parts.append(f"every {self.label_step}th token labelled")
        return "; ".join(parts)


# C0 control characters and DEL have no glyph and are not allowed in SVG (XML): each is drawn as
# its Unicode control picture (NUL -> U+2400 "␀", TAB -> U+2409 "␉", DEL -> U+2421 "␡").
CONTROL_PICTURES = {**{code: 0x2400 + code for code in range(0x20)}, 0x7F: 0x2421}


def model_name(meta) -> str:
    """A short model name for titles: the last two parts of the model folder (meta: a Provenance)."""
    if meta.model == "unknown":  # a file of seed 001's tool: no provenance
        return "attention"
    return "/".join(Path(meta.model).parts[-2:]) or meta.model


def label(token: str) -> str:
    """A token as drawn on a figure: literally, with control characters made visible."""
    return token.translate(CONTROL_PICTURES)


def make_view(tokens: Sequence[str], max_tokens: int | None, max_labels: int = MAX_LABELS) -> View:
    shown = tuple(label(t) for t in (tokens[:max_tokens] if max_tokens else tokens))
    return View(tokens=shown, total=len(tokens), label_step=max(1, math.ceil(len(shown) / max_labels)))


# ----------------------------------------------------------------------------- drawing on Axes


def heatmap(ax: Axes, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
            cmap: str = DEFAULT_CMAP, vmin: float = 0.0, vmax: float | None = None,
            label_step: int = 1, fontsize: float = 8) -> Axes:
    """One (query, key) matrix: cell (i, j) at row i (query i), column j (key j), top-left origin."""
    rows, cols = matrix.shape  # (query, key)
    ax.imshow(matrix, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    ax.set_yticks(range(0, rows, label_step), [row_labels[i] for i in range(0, rows, label_step)],
                  fontsize=fontsize)
    ax.set_xticks(range(0, cols, label_step), [col_labels[j] for j in range(0, cols, label_step)],
                  fontsize=fontsize, rotation=90)
    ax.tick_params(length=0)
    ax.set_ylabel("query")
    ax.set_xlabel("key")
    return ax


def thumbnail(ax: Axes, matrix: np.ndarray, *, cmap: str = DEFAULT_CMAP, vmax: float | None = None) -> Axes:
    """A small (query, key) panel without tick labels, for grids."""
    ax.imshow(matrix, cmap=cmap, vmin=0.0, vmax=vmax, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def colorbar(ax: Axes, label: str = "attention probability"):
    """A colour bar for the last image drawn on `ax`."""
    return ax.figure.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.02, label=label)


def head_grid(axes: np.ndarray, attention: np.ndarray, tokens: Sequence[str], head_ids: Sequence[int], *,
              cmap: str = DEFAULT_CMAP, col_tokens: Sequence[str] | None = None) -> np.ndarray:
    """Every head of one layer, one panel each. attention: (head, query, key); extra axes hidden.

    `col_tokens` labels the keys when they differ from the queries (cross-attention)."""
    flat = axes.ravel()
    col_tokens = tokens if col_tokens is None else col_tokens
    labelled = max(len(tokens), len(col_tokens)) <= GRID_MAX_LABELS
    for ax, matrix, head_id in zip(flat, attention, head_ids):
        if labelled:
            heatmap(ax, matrix, tokens, col_tokens, cmap=cmap, vmax=1.0, fontsize=6)
            ax.set_xlabel("")
            ax.set_ylabel("")
        else:
            thumbnail(ax, matrix, cmap=cmap, vmax=1.0)
        ax.set_title(f"head {head_id}", fontsize=9)
    for ax in flat[len(attention):]:
        ax.set_visible(False)
    return axes


def model_view(axes: np.ndarray, attention: np.ndarray, layer_ids: Sequence[int], head_ids: Sequence[int], *,
               cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """All layers x heads as thumbnails. axes: (layer, head) grid; attention: (layer, head, query, key)."""
    for li, layer_id in enumerate(layer_ids):
        for hi, head_id in enumerate(head_ids):
            ax = thumbnail(axes[li, hi], attention[li, hi], cmap=cmap, vmax=1.0)
            if li == 0:
                ax.set_title(f"H{head_id}", fontsize=8)
            if hi == 0:
                ax.set_ylabel(f"L{layer_id}", fontsize=8, rotation=0, ha="right", va="center")
    return axes


# ----------------------------------------------------------------------------- whole figures


def _grid_shape(count: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(count, max_cols)
    return math.ceil(count / cols), cols


def _side(n: int) -> float:
    """Inches for an n-token heatmap axis: room for labels, bounded for long texts."""
    return float(np.clip(1.5 + 0.28 * n, 4.0, 14.0))


def _suptitle(fig: Figure, title: str, note: str) -> None:
    fig.suptitle(title + (f"\n{note}" if note else ""), fontsize=10)


def _notes(view: View, col_view: View | None) -> str:
    """The figure's note; a separate key view (cross-attention) gets its own, marked as such."""
    if col_view is None or not col_view.note:
        return view.note
    return "; ".join(n for n in (view.note and f"rows: {view.note}", f"columns: {col_view.note}") if n)


def head_figure(matrix: np.ndarray, view: View, title: str, *, cmap: str = DEFAULT_CMAP,
                col_view: View | None = None) -> Figure:
    """One head (or a head average): token-labelled heatmap with a colour bar.

    `col_view` gives the key tokens when they are not the query tokens (cross-attention: rows are
    target tokens, columns source tokens); the matrix may then be rectangular."""
    cols = view if col_view is None else col_view
    m, c = len(view.tokens), len(cols.tokens)
    fig = Figure(figsize=(_side(c) + 1.2, _side(m) + 0.6), layout="constrained")
    ax = fig.add_subplot()
    heatmap(ax, matrix[:m, :c], view.tokens, cols.tokens, cmap=cmap,
            label_step=max(view.label_step, cols.label_step))
    colorbar(ax)
    _suptitle(fig, title, _notes(view, col_view))
    return fig


def heads_figure(attention: np.ndarray, view: View, head_ids: Sequence[int], title: str, *,
                 cmap: str = DEFAULT_CMAP, col_view: View | None = None) -> Figure:
    """Every head of one layer in a grid (seed 003's multi-head figure). attention: (head, query, key)."""
    cols = view if col_view is None else col_view
    m, c = len(view.tokens), len(cols.tokens)
    rows, grid_cols = _grid_shape(len(head_ids))
    panel = 3.0 if max(m, c) <= GRID_MAX_LABELS else 2.2
    fig = Figure(figsize=(grid_cols * panel + 0.8, rows * panel + 0.6), layout="constrained")
    axes = fig.subplots(rows, grid_cols, squeeze=False)
    head_grid(axes, attention[:, :m, :c], view.tokens, head_ids, cmap=cmap, col_tokens=cols.tokens)
    fig.colorbar(axes[0, 0].images[-1], ax=axes, shrink=0.6, label="attention probability")
    _suptitle(fig, title, _notes(view, col_view))
    return fig


def layers_figure(attention: np.ndarray, view: View, layer_ids: Sequence[int], head_ids: Sequence[int],
                  title: str, *, cmap: str = DEFAULT_CMAP, col_view: View | None = None) -> Figure:
    """All layers x heads in one figure ("model view"). attention: (layer, head, query, key)."""
    m = len(view.tokens)
    c = len((view if col_view is None else col_view).tokens)
    panel = float(np.clip(10 / max(len(head_ids), len(layer_ids)), 0.9, 2.0))  # inches per panel
    fig = Figure(figsize=(len(head_ids) * panel + 1.6, len(layer_ids) * panel + 0.9), layout="constrained")
    axes = fig.subplots(len(layer_ids), len(head_ids), squeeze=False)
    model_view(axes, attention[:, :, :m, :c], layer_ids, head_ids, cmap=cmap)
    fig.colorbar(axes[0, 0].images[-1], ax=axes, shrink=0.6, label="attention probability")
    _suptitle(fig, title + " · rows = query, columns = key", _notes(view, col_view))
    return fig


def layer_average_figure(averages: np.ndarray, view: View, layer_ids: Sequence[int], title: str, *,
                         cmap: str = DEFAULT_CMAP, col_view: View | None = None) -> Figure:
    """Mean over heads of several layers, one labelled panel each. averages: (layer, query, key)."""
    cols = view if col_view is None else col_view
    m, c = len(view.tokens), len(cols.tokens)
    rows, grid_cols = _grid_shape(len(layer_ids), 3)
    panel = 3.2 if max(m, c) <= GRID_MAX_LABELS else 2.4
    fig = Figure(figsize=(grid_cols * panel + 0.8, rows * panel + 0.6), layout="constrained")
    axes = fig.subplots(rows, grid_cols, squeeze=False)
    head_grid(axes, averages[:, :m, :c], view.tokens, layer_ids, cmap=cmap, col_tokens=cols.tokens)
    for ax, layer_id in zip(axes.ravel(), layer_ids):
        ax.set_title(f"layer {layer_id}", fontsize=9)
    fig.colorbar(axes[0, 0].images[-1], ax=axes, shrink=0.6, label="mean attention over heads")
    _suptitle(fig, title, _notes(view, col_view))
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = 150) -> None:
    """Write `fig` as PNG/SVG/PDF (by suffix), atomically and without timestamps."""
    fmt = path.suffix.lower().lstrip(".")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, metadata=SAVE_METADATA[fmt], facecolor="white")


def save_drawing(draw: Callable[[Axes], object], path: Path, *, figsize: tuple[float, float] = (6, 4),
                 dpi: int = 150) -> Path:
    """Make a one-Axes figure, let `draw(ax)` fill it, save it with `save_figure`; returns `path`.

    The analysis commands' figures (attnpipe.analyze.commands): the plot functions of
    analysis_plots and relevance_plots draw on the Axes, this creates and saves the figure.
    """
    fig = Figure(figsize=figsize, layout="constrained")
    draw(fig.subplots())
    save_figure(fig, path, dpi=dpi)
    return path


# ----------------------------------------------------------------------------- generated text

GENERATED_COLOR = "#ff1f1f"  # the prompt/continuation boundary: a red that none of the usual colormaps has
GENERATED_NOTE = "red: generated tokens; dashes: end of the prompt"


def first_generated(generated) -> int | None:
    """Position of the first token the model generated, or None (a file without generated tokens)."""
    if generated is None:
        return None
    flags = np.asarray(generated, dtype=bool)
    return int(np.argmax(flags)) if flags.any() else None


def mark_generated(fig: Figure, generated, view: View) -> Figure:
    """Draw the prompt/continuation boundary on every (query, key) panel of a square self-attention
    figure: a dashed line before the first generated token across the rows and the columns, and the
    generated tokens' labels in the same colour. `generated`: (n,) bool per token (store `generated`)."""
    first = first_generated(generated)
    if first is None:
        return fig
    for ax in fig.axes:
        if not ax.images:  # colour bars
            continue
        if first < len(view.tokens):  # the boundary lies inside the shown token window
            for line in (ax.axhline, ax.axvline):
                line(first - 0.5, color=GENERATED_COLOR, linewidth=1.2, linestyle="--")
        for ticks, labels in ((ax.get_yticks(), ax.get_yticklabels()), (ax.get_xticks(), ax.get_xticklabels())):
            for tick, text in zip(ticks, labels):
                if tick >= first:
                    text.set_color(GENERATED_COLOR)
    title = fig.get_suptitle()
    fig.suptitle(f"{title}\n{GENERATED_NOTE}" if title else GENERATED_NOTE, fontsize=10)
    return fig
