"""Plots of analysis tables. Each function draws on the Axes it is given and returns it;
attnpipe.visualize.plots.save_drawing creates and saves the figures. Rows of the long tables are
(layer, head) model indices, drawn as L{layer}.H{head}."""

from __future__ import annotations

import matplotlib as mpl
import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from attnpipe.analyze.metrics import METRICS


def metric_by_layer(ax: Axes, aggregate: pd.DataFrame, metric: str = "entropy") -> Axes:
    """Each head's mean `metric` as a dot per layer, and the layer mean (over heads) as a line."""
    rows = aggregate[aggregate["metric"] == metric]
    ax.scatter(rows["layer"], rows["mean"], s=12, alpha=0.5, label="one head (mean over texts)")
    per_layer = rows.groupby("layer")["mean"].mean()
    ax.plot(per_layer.index, per_layer.to_numpy(), marker="o", color="black", label="mean over heads")
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{metric} ({METRICS[metric].unit})" if metric in METRICS else metric)
    ax.set_xticks(per_layer.index)
    ax.legend(loc="best", fontsize="small")
    return ax


def head_embedding(ax: Axes, clusters: pd.DataFrame) -> Axes:
    """MDS coordinates of the heads, coloured by cluster, each labelled L{layer}.H{head}."""
    palette = mpl.colormaps["tab10" if clusters["cluster"].nunique() <= 10 else "tab20"]
    for index, (cluster, rows) in enumerate(clusters.groupby("cluster")):
        ax.scatter(rows["x"], rows["y"], s=28, color=palette(index % palette.N), edgecolor="white", linewidth=0.5,
                   label=f"cluster {cluster} ({len(rows)} head{'s' * (len(rows) > 1)})", zorder=2)
    fontsize = 7 if len(clusters) <= 40 else 5.5
    for row in clusters.itertuples():  # labels beside the dot, small: many heads sit close together
        ax.annotate(f"L{int(row.layer)}.H{int(row.head)}", (row.x, row.y), xytext=(3, 2),
                    textcoords="offset points", fontsize=fontsize, alpha=0.85, zorder=3)
    ax.set_xlabel("MDS 1 (Jensen-Shannon distance between heads)")
    ax.set_ylabel("MDS 2")
    k = clusters.attrs.get("num_clusters", clusters["cluster"].nunique())
    ax.set_title(f"Heads by attention similarity: {len(clusters)} heads, {k} clusters (average linkage)",
                 fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)
    ax.margins(0.08)
    return ax


def change_by_checkpoint(ax: Axes, distances: pd.DataFrame, column: str = "js_to_previous") -> Axes:
    """Per layer, the mean over heads of `column` against the checkpoints, named on the axis."""
    for layer, rows in distances.groupby("layer"):
        series = rows.groupby("checkpoint")[column].mean()
        ax.plot(series.index, series.to_numpy(), marker="o", label=f"layer {layer}")
    order = np.unique(distances["checkpoint"])
    if "checkpoint_name" in distances:
        names = distances.drop_duplicates("checkpoint").set_index("checkpoint")["checkpoint_name"]
        ax.set_xticks(order, [str(names[k]) for k in order], rotation=30, ha="right")
        ax.set_xlabel("checkpoint (in the order given)")
    else:  # a table written before checkpoint names were stored
        ax.set_xticks(order)
        ax.set_xlabel("checkpoint (order given)")
    ylabel = {"js_to_previous": "JS distance to the previous checkpoint",
              "js_to_first": "JS distance to the first checkpoint"}.get(column, column)
    ax.set_ylabel(ylabel + "\n(mean over heads)")
    ax.legend(loc="best", fontsize="small")
    return ax


def role_profiles(ax: Axes, table: pd.DataFrame) -> Axes:
    """Heads (rows, 'layer-head') x roles (columns): mean weight on each kind of key."""
    columns = [c for c in table.columns if c.startswith("mean_")]
    values = table[columns].to_numpy(dtype=float)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(columns)), [c.removeprefix("mean_") for c in columns], rotation=45, ha="right")
    labels = [f"L{layer}.H{head}  ({consistency:.0%})" for layer, head, consistency
              in table[["layer", "head", "consistency"]].itertuples(index=False)]
    ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 40 else 8)
    ax.set_ylabel("head (consistency of its dominant role)")
    ax.set_title("head specialisation: mean weight on each kind of key")
    ax.figure.colorbar(image, ax=ax, label="mean attention weight")
    return ax
