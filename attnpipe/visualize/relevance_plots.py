"""Figures for the gradient-based methods: relevance maps beside raw attention and rollout, head
importance, perturbation curves. Drawing functions take an Axes and return it; `maps_figure`
builds a Figure (no pyplot) for attnpipe.visualize.plots.save_figure."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from attnpipe.visualize.plots import DEFAULT_CMAP, colorbar, heatmap, make_view


def maps_figure(maps: dict[str, np.ndarray], tokens: Sequence[str], title: str,
                max_tokens: int | None = None, cmap: str = DEFAULT_CMAP) -> Figure:
    """One panel per (n, n) map, each on its own colour scale (their units differ)."""
    view = make_view(tokens, max_tokens)
    k = len(view.tokens)
    side = max(3.0, 0.22 * k + 1.5)
    fig = Figure(figsize=(side * len(maps), side + 0.6), layout="constrained")
    axes = fig.subplots(1, len(maps), squeeze=False)[0]
    for ax, (name, matrix) in zip(axes, maps.items()):
        shown = np.asarray(matrix)[:k, :k]  # (query, key)
        heatmap(ax, shown, view.tokens, view.tokens, cmap=cmap, vmin=0.0,
                vmax=float(shown.max()) or None, label_step=view.label_step)
        ax.set_title(name, fontsize=9)
        colorbar(ax, label="")
    fig.suptitle(title + (f"\n{view.note}" if view.note else ""), fontsize=10)
    return fig


def head_importance(ax: Axes, matrix: np.ndarray, layer_ids: Sequence[int], label: str,
                    cmap: str = DEFAULT_CMAP) -> Axes:
    """(layer, head) matrix of importance scores: rows = layers, columns = heads."""
    image = ax.imshow(matrix, cmap=cmap, interpolation="nearest", aspect="auto")
    ax.set_yticks(range(len(layer_ids)), [str(l) for l in layer_ids])
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_ylabel("layer")
    ax.set_xlabel("head")
    ax.figure.colorbar(image, ax=ax, label=label)
    return ax


def perturbation_curves(ax: Axes, curve: pd.DataFrame) -> Axes:
    """Mean drop of the target per deleted fraction, one line per method."""
    for method, rows in curve.groupby("method", sort=False):
        style = dict(color="grey", linestyle="--") if method == "random" else {}
        ax.plot(rows["fraction"], rows["drop"], marker="o", label=method, **style)
    ax.set_xlabel("fraction of tokens deleted (highest scores first)")
    ax.set_ylabel("mean drop of the target")
    ax.axhline(0.0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    return ax
