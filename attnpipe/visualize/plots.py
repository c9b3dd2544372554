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

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib as mpl
import matplotlib.colors as mcolors
import matplotlib.ticker as ticker
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnpipe.errors import AttnpipeError
from attnpipe.visualize.fonts import use_fallback_fonts
from attnpipe.visualize.outputs import atomic_path

# A token such as "$\frac$" makes savefig raise when parsed as mathtext: draw strings literally.
mpl.rcParams["text.parse_math"] = False
# SVG element ids are hashed from this salt (default: random per run); fixed -> identical files.
mpl.rcParams["svg.hashsalt"] = "attnpipe"
# SVG text stays text (<text> elements: searchable, editable in a paper's figure, checked by tests);
# the font chain below is written as its font-family.
mpl.rcParams["svg.fonttype"] = "none"
use_fallback_fonts()  # CJK and other scripts draw from the installed fonts (attnpipe.visualize.fonts)

DEFAULT_CMAP = "viridis"  # perceptually uniform, readable in greyscale and by colour-blind readers
MAX_LABELS = 60  # more tokens than this on an axis: label every k-th one (stated on the figure)
# Dates are the only thing that varies between two saves of the same figure.
SAVE_METADATA = {"png": {}, "svg": {"Date": None}, "pdf": {"CreationDate": None}}


@dataclass(frozen=True)
class View:
    """What one figure shows of a token axis: which tokens, how they are labelled, for the note."""

    tokens: tuple[str, ...]  # labels of the shown tokens
    total: int  # tokens in the text
    label_step: int
    positions: tuple[int, ...] = ()  # token positions shown (default: the first len(tokens))
    window: str = ""  # how the shown tokens were chosen, for the note ("" = all of them)
    hidden: int = 0  # special tokens left out (--hide-special)

    def __post_init__(self):
        if not self.positions:
            object.__setattr__(self, "positions", tuple(range(len(self.tokens))))

    def note_for(self, label_step: int) -> str:
        parts = [self.window] if self.window else []
        if self.hidden:
            parts.append(f"{self.hidden} special token{'s' * (self.hidden > 1)} hidden (rows not renormalised)")
        if label_step > 1:
            parts.append(f"every {ordinal(label_step)} token labelled")
        return "; ".join(parts)

    @property
    def note(self) -> str:
        return self.note_for(self.label_step)


def ordinal(k: int) -> str:
    return f"{k}{'th' if 10 <= k % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(k % 10, 'th')}"


@dataclass(frozen=True)
class Colors:
    """How values map to colours: `scale` fixed (vmin..vmax, default 0..1), figure (0..the largest
    value the figure shows) or panel (each panel its own largest value); `log` for a log scale."""

    scale: Literal["fixed", "figure", "panel"] = "figure"
    vmin: float | None = None
    vmax: float | None = None
    log: bool = False
    label: str = "attention probability"

    def norm(self, values: np.ndarray) -> mcolors.Normalize:
        """The colour normalisation for `values` (all the figure shows, or one panel's)."""
        top = self.vmax if self.vmax is not None else (1.0 if self.scale == "fixed" else float(np.max(values)))
        if self.log:
            low = self.vmin if self.vmin is not None else LOG_FLOOR
            return mcolors.LogNorm(vmin=low, vmax=max(top, low * 10), clip=True)
        low = 0.0 if self.vmin is None else self.vmin
        return mcolors.Normalize(vmin=low, vmax=top if top > low else low + 1.0)

    @property
    def bar_label(self) -> str:
        where = {"fixed": "", "figure": "", "panel": " (each panel: 0 to its largest value)"}[self.scale]
        return self.label + (" (log scale)" if self.log else "") + where


LOG_FLOOR = 1e-3  # --log without --vmin: values below 0.001 share the darkest colour
DEFAULT_COLORS = Colors()


# C0 control characters and DEL have no glyph and are not allowed in SVG (XML): each is drawn as
# its Unicode control picture (NUL -> U+2400 "␀", TAB -> U+2409 "␉", DEL -> U+2421 "␡").
CONTROL_PICTURES = {**{code: 0x2400 + code for code in range(0x20)}, 0x7F: 0x2421}


def model_name(meta) -> str:
    """A short model name for titles: the last two parts of the model folder (meta: a Provenance)."""
    if meta.model == "unknown":  # a file of seed 001's tool: no provenance
        return "attention"
    return "/".join(Path(meta.model).parts[-2:]) or meta.model


def head_name(layer: int, head: int) -> str:
    """A head as every figure and table names it: model layer and head indices."""
    return f"L{layer}.H{head}"


def label(token: str) -> str:
    """A token as drawn on a figure: literally, with control characters made visible."""
    return token.translate(CONTROL_PICTURES)


def parse_range(text: str, total: int) -> tuple[int, int]:
    """'A:B' (Python slice bounds, negative from the end, either side may be empty) -> (start, stop)."""
    try:
        first, _, last = text.partition(":")
        if not _:
            raise ValueError
        start = int(first) if first.strip() else 0
        stop = int(last) if last.strip() else total
    except ValueError as err:
        raise AttnpipeError(f"--tokens-range takes A:B (token positions, e.g. 40:80 or -30:), got {text!r}") from err
    start, stop, _ = slice(start, stop).indices(total)
    if stop <= start:
        raise AttnpipeError(f"--tokens-range {text} selects no token: the text has {total} tokens (0-{total - 1})")
    return start, stop


def make_view(tokens: Sequence[str], max_tokens: int | None = None, max_labels: int = MAX_LABELS, *,
              tokens_range: str | None = None, special: Sequence[bool] | None = None) -> View:
    """The tokens a figure shows: `--max-tokens N` (the first N), or `--tokens-range A:B` (any
    window), minus special tokens when `special` (a per-token mask) is given."""
    total = len(tokens)
    if tokens_range is not None:
        start, stop = parse_range(tokens_range, total)
        window = f"tokens {start}-{stop - 1} of {total} shown (--tokens-range)" if (start, stop) != (0, total) else ""
    else:
        start, stop = 0, min(total, max_tokens) if max_tokens else total
        window = f"first {stop} of {total} tokens shown (--max-tokens)" if stop < total else ""
    positions = list(range(start, stop))
    hidden = 0
    if special is not None:
        kept = [p for p in positions if not special[p]]
        if not kept:
            raise AttnpipeError("--hide-special leaves no token to show (every shown token is special)")
        hidden, positions = len(positions) - len(kept), kept
    shown = tuple(label(tokens[p]) for p in positions)
    return View(tokens=shown, total=total, label_step=max(1, math.ceil(len(shown) / max_labels)),
                positions=tuple(positions), window=window, hidden=hidden)


def crop(attention: np.ndarray, view: View, col_view: View | None = None) -> np.ndarray:
    """The (..., query, key) values a figure shows: rows of `view`, columns of `col_view` (or `view`)."""
    cols = view if col_view is None else col_view
    return attention[..., list(view.positions), :][..., list(cols.positions)]


# ----------------------------------------------------------------------------- drawing on Axes


def heatmap(ax: Axes, matrix: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], *,
            cmap: str = DEFAULT_CMAP, vmin: float = 0.0, vmax: float | None = None,
            label_step: int = 1, fontsize: float = 8, norm: mcolors.Normalize | None = None,
            rows_labelled: bool = True, cols_labelled: bool = True) -> Axes:
    """One (query, key) matrix: cell (i, j) at row i (query i), column j (key j), top-left origin."""
    rows, cols = matrix.shape  # (query, key)
    if norm is None:
        norm = mcolors.Normalize(vmin=vmin, vmax=float(np.max(matrix)) if vmax is None else vmax)
    ax.imshow(matrix, cmap=cmap, norm=norm, interpolation="nearest", aspect="equal")
    ax.set_yticks(range(0, rows, label_step),
                  [row_labels[i] for i in range(0, rows, label_step)] if rows_labelled else [],
                  fontsize=fontsize)
    ax.set_xticks(range(0, cols, label_step),
                  [col_labels[j] for j in range(0, cols, label_step)] if cols_labelled else [],
                  fontsize=fontsize, rotation=90)
    ax.tick_params(length=0 if label_step == 1 else 2, width=0.5)
    ax.set_ylabel("query")
    ax.set_xlabel("key")
    return ax


def thumbnail(ax: Axes, matrix: np.ndarray, *, cmap: str = DEFAULT_CMAP, vmax: float | None = None,
              norm: mcolors.Normalize | None = None) -> Axes:
    """A small (query, key) panel without tick labels, for grids."""
    ax.imshow(matrix, cmap=cmap, norm=norm or mcolors.Normalize(0.0, vmax), interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([])
    return ax


def colorbar(ax: Axes, label: str = "attention probability"):
    """A colour bar for the last image drawn on `ax`."""
    return plain_ticks(ax.figure.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.02, label=label))


def plain_ticks(bar):
    """Log colour bars: ticks as 0.001, 0.01, ... (the default 10^k labels are mathtext, which is
    off here so that tokens draw literally)."""
    if isinstance(bar.norm, mcolors.LogNorm):
        bar.ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        bar.ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    return bar


def grid_label_step(count: int, panel_inches: float, fontsize: float) -> int:
    """Label every k-th token so that labels of `fontsize` points fit on a panel side."""
    fits = max(1, int(panel_inches * 72 / (fontsize * 1.25)))
    return max(1, math.ceil(count / fits))


def head_grid(axes: np.ndarray, attention: np.ndarray, tokens: Sequence[str], head_ids: Sequence[int], *,
              cmap: str = DEFAULT_CMAP, col_tokens: Sequence[str] | None = None,
              colors: Colors = DEFAULT_COLORS, label_step: int = 1, fontsize: float = 6,
              titles: Sequence[str] | None = None) -> np.ndarray:
    """Every head of one layer, one panel each. attention: (head, query, key); extra axes hidden.

    The outer panels carry the tokens: the left column the query labels, the lowest panel of each
    column the key labels (every `label_step`-th). `col_tokens` labels the keys when they differ
    from the queries (cross-attention)."""
    col_tokens = tokens if col_tokens is None else col_tokens
    nrows, ncols = axes.shape
    figure_norm = colors.norm(attention)
    count = len(attention)
    for index, (matrix, head_id) in enumerate(zip(attention, head_ids)):
        r, c = divmod(index, ncols)
        ax = axes[r, c]
        lowest = index + ncols >= count  # nothing below it in its column
        norm = colors.norm(matrix) if colors.scale == "panel" else figure_norm
        heatmap(ax, matrix, tokens, col_tokens, cmap=cmap, norm=norm, label_step=label_step, fontsize=fontsize,
                rows_labelled=c == 0, cols_labelled=lowest)
        ax.set_xlabel("key" if lowest else "", fontsize=fontsize + 1)
        ax.set_ylabel("query" if c == 0 else "", fontsize=fontsize + 1)
        ax.set_title(titles[index] if titles is not None else f"head {head_id}", fontsize=fontsize + 3)
        if colors.scale == "panel":
            plain_ticks(ax.figure.colorbar(ax.images[-1], ax=ax, fraction=0.046, pad=0.02)).ax.tick_params(
                labelsize=fontsize)
    for ax in axes.ravel()[count:]:
        ax.set_visible(False)
    return axes


def model_view(axes: np.ndarray, attention: np.ndarray, layer_ids: Sequence[int], head_ids: Sequence[int], *,
               cmap: str = DEFAULT_CMAP, colors: Colors = DEFAULT_COLORS) -> np.ndarray:
    """All layers x heads as thumbnails. axes: (layer, head) grid; attention: (layer, head, query, key)."""
    figure_norm = colors.norm(attention)
    for li, layer_id in enumerate(layer_ids):
        for hi, head_id in enumerate(head_ids):
            matrix = attention[li, hi]
            ax = thumbnail(axes[li, hi], matrix, cmap=cmap,
                           norm=colors.norm(matrix) if colors.scale == "panel" else figure_norm)
            if li == 0:
                ax.set_title(f"H{head_id}", fontsize=8)
            if hi == 0:
                ax.set_ylabel(f"L{layer_id}", fontsize=8, rotation=0, ha="right", va="center")
    return axes


# ----------------------------------------------------------------------------- whole figures


@dataclass(frozen=True)
class Style:
    """Figure options shared by every figure mode: colours, font size, a title of the user's."""

    colors: Colors = DEFAULT_COLORS
    fontsize: float | None = None  # token labels in points (default: 8 on one heatmap, 6 in grids)
    title: str | None = None  # replaces the automatic first title line (the note stays)


DEFAULT_STYLE = Style()


def _grid_shape(count: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(count, max_cols)
    return math.ceil(count / cols), cols


def _side(n: int, fontsize: float = 8) -> float:
    """Inches for an n-token heatmap axis: room for labels, bounded for long texts."""
    return float(np.clip(1.5 + 0.035 * fontsize * n, 4.0, 14.0))


def _panel(n: int, fontsize: float) -> float:
    """Inches per grid panel: every token label fits up to ~60 tokens, thinned beyond (stated)."""
    return float(np.clip(0.9 + 0.021 * fontsize * n, 2.8, 6.0))


def _suptitle(fig: Figure, title: str, note: str, style: Style = DEFAULT_STYLE) -> None:
    fig.suptitle((style.title if style.title is not None else title) + (f"\n{note}" if note else ""), fontsize=10)


def _notes(view: View, col_view: View | None, label_step: int | None = None) -> str:
    """The figure's note; a separate key view (cross-attention) gets its own, marked as such."""
    step = view.label_step if label_step is None else label_step
    if col_view is None:
        return view.note_for(step)
    rows, cols = view.note_for(1), col_view.note_for(1)
    parts = [n for n in (rows and f"rows: {rows}", cols and f"columns: {cols}") if n]
    if step > 1:
        parts.append(f"every {ordinal(step)} token labelled")
    return "; ".join(parts)


def _figure_colorbar(fig: Figure, axes: np.ndarray, colors: Colors) -> None:
    if colors.scale != "panel":
        plain_ticks(fig.colorbar(axes[0, 0].images[-1], ax=axes, shrink=0.6, label=colors.bar_label))


def head_figure(matrix: np.ndarray, view: View, title: str, *, cmap: str = DEFAULT_CMAP,
                col_view: View | None = None, style: Style = DEFAULT_STYLE) -> Figure:
    """One head (or a head average): token-labelled heatmap with a colour bar.

    `matrix` is the whole (query, key) matrix of the text; `view` (and `col_view` for the keys
    when they are not the query tokens, as in cross-attention) say which part is drawn."""
    cols = view if col_view is None else col_view
    m, c = len(view.tokens), len(cols.tokens)
    fontsize = style.fontsize or 8
    fig = Figure(figsize=(_side(c, fontsize) + 1.2, _side(m, fontsize) + 0.6), layout="constrained")
    ax = fig.add_subplot()
    shown = crop(matrix, view, col_view)
    step = max(view.label_step, cols.label_step)
    heatmap(ax, shown, view.tokens, cols.tokens, cmap=cmap, label_step=step, fontsize=fontsize,
            norm=style.colors.norm(shown))
    colorbar(ax, style.colors.bar_label)
    _suptitle(fig, title, _notes(view, col_view), style)
    return fig


def _grid_figure(attention: np.ndarray, view: View, titles: Sequence[str], title: str, *, cmap: str,
                 col_view: View | None, style: Style, max_cols: int) -> Figure:
    cols = view if col_view is None else col_view
    m, c = len(view.tokens), len(cols.tokens)
    fontsize = style.fontsize or 6
    rows, grid_cols = _grid_shape(len(titles), max_cols)
    panel = _panel(max(m, c), fontsize)
    step = grid_label_step(max(m, c), panel - 0.3, fontsize)
    fig = Figure(figsize=(grid_cols * panel + 1.2, rows * panel + 0.9), layout="constrained")
    axes = fig.subplots(rows, grid_cols, squeeze=False)
    head_grid(axes, crop(attention, view, col_view), view.tokens, range(len(titles)), cmap=cmap,
              col_tokens=cols.tokens, colors=style.colors, label_step=step, fontsize=fontsize, titles=titles)
    _figure_colorbar(fig, axes, style.colors)
    _suptitle(fig, title, _notes(view, col_view, step), style)
    return fig


def heads_figure(attention: np.ndarray, view: View, head_ids: Sequence[int], title: str, *,
                 cmap: str = DEFAULT_CMAP, col_view: View | None = None, layer: int | None = None,
                 style: Style = DEFAULT_STYLE) -> Figure:
    """Every head of one layer in a grid (seed 003's multi-head figure). attention: (head, query, key).

    Panels are titled L{layer}.H{head} (H{head} when `layer` is not given)."""
    titles = [head_name(layer, h) if layer is not None else f"H{h}" for h in head_ids]
    return _grid_figure(attention, view, titles, title, cmap=cmap, col_view=col_view, style=style, max_cols=4)


def layers_figure(attention: np.ndarray, view: View, layer_ids: Sequence[int], head_ids: Sequence[int],
                  title: str, *, cmap: str = DEFAULT_CMAP, col_view: View | None = None,
                  style: Style = DEFAULT_STYLE) -> Figure:
    """All layers x heads in one figure ("model view"). attention: (layer, head, query, key)."""
    panel = float(np.clip(10 / max(len(head_ids), len(layer_ids)), 0.9, 2.0))  # inches per panel
    fig = Figure(figsize=(len(head_ids) * panel + 1.6, len(layer_ids) * panel + 0.9), layout="constrained")
    axes = fig.subplots(len(layer_ids), len(head_ids), squeeze=False)
    model_view(axes, crop(attention, view, col_view), layer_ids, head_ids, cmap=cmap, colors=style.colors)
    if style.colors.scale != "panel":
        plain_ticks(fig.colorbar(axes[0, 0].images[-1], ax=axes, shrink=0.6, label=style.colors.bar_label))
    _suptitle(fig, title + " · rows = query, columns = key", _notes(view, col_view, 1), style)
    return fig


def layer_average_figure(averages: np.ndarray, view: View, layer_ids: Sequence[int], title: str, *,
                         cmap: str = DEFAULT_CMAP, col_view: View | None = None,
                         style: Style = DEFAULT_STYLE) -> Figure:
    """Mean over heads of several layers, one labelled panel each. averages: (layer, query, key)."""
    style = Style(colors=dataclasses.replace(style.colors, label="mean attention over heads"),
                  fontsize=style.fontsize, title=style.title)
    return _grid_figure(averages, view, [f"layer {layer}" for layer in layer_ids], title, cmap=cmap,
                        col_view=col_view, style=style, max_cols=3)


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
    figure: a dashed line before the first generated token shown across the rows and the columns,
    and the generated tokens' labels in the same colour. `generated`: (n,) bool per token (store
    `generated`); the figure shows the tokens at `view.positions` (a --tokens-range window, or
    --hide-special), so the flags are taken at those positions."""
    if first_generated(generated) is None:
        return fig
    shown = np.asarray(generated, dtype=bool)[list(view.positions)]
    first = first_generated(shown)  # None: the window shows only the prompt
    for ax in fig.axes:
        if not ax.images:  # colour bars
            continue
        if first is not None and first > 0:  # the boundary lies inside the shown tokens
            for line in (ax.axhline, ax.axvline):
                line(first - 0.5, color=GENERATED_COLOR, linewidth=1.2, linestyle="--")
        for ticks, labels in ((ax.get_yticks(), ax.get_yticklabels()), (ax.get_xticks(), ax.get_xticklabels())):
            for tick, text in zip(ticks, labels):
                if 0 <= tick < len(shown) and shown[int(tick)]:
                    text.set_color(GENERATED_COLOR)
    title = fig.get_suptitle()
    fig.suptitle(f"{title}\n{GENERATED_NOTE}" if title else GENERATED_NOTE, fontsize=10)
    return fig
