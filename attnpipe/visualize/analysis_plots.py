"""Plots of analysis tables. Each function draws on the Axes it is given and returns it;
attnpipe.visualize.plots.save_drawing creates and saves the figures. Rows of the long tables are
(layer, head) model indices."""

from __future__ import annotations

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
    """MDS coordinates of the heads, coloured by cluster and labelled 'layer-head'."""
    for cluster, rows in clusters.groupby("cluster"):
        ax.scatter(rows["x"], rows["y"], s=20, label=f"cluster {cluster}")
    for _, row in clusters.iterrows():
        ax.annotate(f"{row['layer']}-{row['head']}", (row["x"], row["y"]), fontsize=6, alpha=0.7)
    ax.set_xlabel("MDS 1 (JS distance)")
    ax.set_ylabel("MDS 2")
    ax.legend(loc="best", fontsize="small")
    return ax


def change_by_checkpoint(ax: Axes, distances: pd.DataFrame, column: str = "js_to_previous") -> Axes:
    """Per layer, the mean over heads of `column` against checkpoint order."""
    for layer, rows in distances.groupby("layer"):
        series = rows.groupby("checkpoint")[column].mean()
        ax.plot(series.index, series.to_numpy(), marker="o", label=f"layer {layer}")
    ax.set_xlabel("checkpoint (order given)")
    ax.set_ylabel(f"{column} (JS distance)")
    ax.set_xticks(np.unique(distances["checkpoint"]))
    ax.legend(loc="best", fontsize="small")
    return ax


def role_profiles(ax: Axes, table: pd.DataFrame) -> Axes:
    """Heads (rows, 'layer-head') x roles (columns): mean weight on each kind of key."""
    columns = [c for c in table.columns if c.startswith("mean_")]
    values = table[columns].to_numpy(dtype=float)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks(range(len(columns)), [c.removeprefix("mean_") for c in columns], rotation=45, ha="right")
    labels = [f"{layer}-{head}  ({consistency:.0%})" for layer, head, consistency
              in table[["layer", "head", "consistency"]].itertuples(index=False)]
    ax.set_yticks(range(len(labels)), labels, fontsize=6 if len(labels) > 40 else 8)
    ax.set_ylabel("layer-head (consistency of its dominant role)")
    ax.set_title("head specialisation: mean weight on each kind of key")
    ax.figure.colorbar(image, ax=ax, label="mean attention weight")
    return ax
