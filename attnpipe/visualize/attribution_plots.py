"""Figures of --attribution ig and the flow view (attnpipe.analyze.attribution): the attribution
tree, and a Sankey-style flow of attention or attribution between tokens across layers.

Both draw on a given Axes and return it. Levels run left to right: level 0 is the input tokens,
level i + 1 the tokens after the i-th stored layer; a band from token k at one level to token q
at the next is the weight query q gives key k in that layer (its width is proportional to it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.patches import PathPatch
from matplotlib.path import Path as MplPath

from attnpipe.visualize.plots import label

BAND_COLOR = "#3b6ea8"
HUB_COLOR = "#c0392b"


def _band(ax: Axes, x0: float, y0: float, x1: float, y1: float, width: float, color: str, alpha: float) -> None:
    """A ribbon of constant vertical `width` from (x0, y0) to (x1, y1), as two cubic Bézier curves."""
    mid = (x0 + x1) / 2
    half = width / 2
    vertices = [(x0, y0 - half), (mid, y0 - half), (mid, y1 - half), (x1, y1 - half),
                (x1, y1 + half), (mid, y1 + half), (mid, y0 + half), (x0, y0 + half), (x0, y0 - half)]
    codes = [MplPath.MOVETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4,
             MplPath.LINETO, MplPath.CURVE4, MplPath.CURVE4, MplPath.CURVE4, MplPath.CLOSEPOLY]
    ax.add_patch(PathPatch(MplPath(vertices, codes), facecolor=color, edgecolor="none", alpha=alpha))


def _levels(ax: Axes, tokens: Sequence[str], layers: Sequence[int]) -> None:
    n = len(tokens)
    ax.set_xlim(-0.6, len(layers) + 0.6)
    ax.set_ylim(n - 0.5, -0.5)  # token 0 at the top
    ax.set_xticks(range(len(layers) + 1), ["input"] + [f"L{layer}" for layer in layers])
    ax.set_yticks(range(n), [label(t) for t in tokens], fontsize=8)
    ax.set_xlabel("layer (a band from k to q: query q draws on key k)", fontsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def sankey(ax: Axes, edges: pd.DataFrame, inflow: np.ndarray, tokens: Sequence[str], layers: Sequence[int],
           hub_positions: Sequence[set[int]], weight: str = "weight") -> Axes:
    """Bands for `edges` (layer, from_position, to_position, weight), nodes sized by `inflow`
    (L, n) — what each token receives in the next layer, seed 002's hub score —, hubs in red."""
    _levels(ax, tokens, layers)
    top = float(edges[weight].max()) if len(edges) else 1.0
    level = {layer: i for i, layer in enumerate(layers)}
    for row in edges.itertuples(index=False):
        share = getattr(row, weight) / top
        i = level[row.layer]
        _band(ax, i, row.from_position, i + 1, row.to_position, 0.6 * share, BAND_COLOR, 0.15 + 0.5 * share)
    n = len(tokens)
    peak = float(inflow.max()) if inflow.size and inflow.max() > 0 else 1.0
    for i in range(len(layers)):  # node j at level i: what layer i draws from it
        hub = hub_positions[i]
        sizes = 20 + 180 * inflow[i] / peak
        colors = [HUB_COLOR if j in hub else "#555555" for j in range(n)]
        ax.scatter(np.full(n, i), np.arange(n), s=sizes, c=colors, zorder=3)
    ax.scatter(np.full(n, len(layers)), np.arange(n), s=20, c="#555555", zorder=3)
    return ax


def tree(ax: Axes, edges: pd.DataFrame, tokens: Sequence[str], layers: Sequence[int], root: int) -> Axes:
    """The attribution tree: kept edges (layer, from_position, to_position, score) as lines whose
    width and darkness follow the score; the root token at the top level is starred."""
    _levels(ax, tokens, layers)
    level = {layer: i for i, layer in enumerate(layers)}
    used = {(len(layers), root)}
    for row in edges.itertuples(index=False):
        i = level[row.layer]
        ax.plot([i, i + 1], [row.from_position, row.to_position], color=BAND_COLOR,
                linewidth=0.5 + 3.5 * row.score, alpha=0.3 + 0.7 * row.score, solid_capstyle="round")
        used |= {(i, row.from_position), (i + 1, row.to_position)}
    xs, ys = zip(*sorted(used))
    ax.scatter(xs, ys, s=25, c="#555555", zorder=3)
    ax.scatter([len(layers)], [root], s=160, marker="*", c=HUB_COLOR, zorder=4)
    return ax
