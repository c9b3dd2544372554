"""Plots of circuits over training (attnpipe.analyze.phase_change tables). Each function draws on the
Axes it is given and returns it. The x-axis is the training step of each checkpoint when every step
is known, else the checkpoints' names in the order given; heads are labelled L{layer}.H{head}."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from attnpipe.analyze.circuits import head_name


def checkpoint_axis(ax: Axes, steps: Sequence[int | None], names: Sequence[str]) -> list[float]:
    """x positions of the checkpoints (their steps, or 0, 1, ... with the names as ticks)."""
    if all(s is not None for s in steps):
        ax.set_xlabel("training step")
        return [float(s) for s in steps]
    ax.set_xticks(range(len(names)), list(names), rotation=30, ha="right")
    ax.set_xlabel("checkpoint")
    return [float(i) for i in range(len(names))]


def mark_interval(ax: Axes, x: Sequence[float], before: int, after: int) -> None:
    ax.axvspan(x[before], x[after], color="tab:orange", alpha=0.15, lw=0, label="largest change")


def in_context_loss(ax: Axes, loss: pd.DataFrame, steps: Sequence[int | None], names: Sequence[str],
                    interval: tuple[int, int] | None = None) -> Axes:
    """Loss on the first and on the repeated half, and their difference, per checkpoint."""
    x = checkpoint_axis(ax, steps, names)
    ax.plot(x, loss["loss_first"], marker="o", label="loss on the first half")
    ax.plot(x, loss["loss_repeat"], marker="o", label="loss on the repeated half")
    ax.plot(x, loss["in_context_loss"], marker="o", color="black", label="in-context loss (repeat − first)")
    ax.axhline(0.0, color="grey", lw=0.8)
    if interval is not None:
        mark_interval(ax, x, *interval)
    ax.set_ylabel("nats per token")
    ax.legend(loc="best", fontsize="small")
    return ax


def detector_curves(ax: Axes, summary: pd.DataFrame, metric: str, steps: Sequence[int | None],
                    names: Sequence[str], interval: tuple[int, int] | None = None) -> Axes:
    """One line per head: its mean `metric` score per checkpoint; dashed: a uniform head's score."""
    x = checkpoint_axis(ax, steps, names)
    rows = summary[summary["metric"] == metric]
    position = {name: x[i] for i, name in enumerate(names)}
    for (layer, head), line in rows.groupby(["layer", "head"], sort=True):
        ax.plot(line["checkpoint"].map(position), line["mean"], marker=".", label=head_name(layer, head))
    chance = rows.groupby("checkpoint", sort=False)["chance"].first().reindex(list(names))
    ax.plot(x, chance.to_numpy(), ls="--", color="grey", label="uniform head")
    if interval is not None:
        mark_interval(ax, x, *interval)
    ax.set_title(metric.replace("_", " "))
    ax.set_ylabel("score (attention weight)")
    ax.set_ylim(-0.02, 1.02)
    return ax


def offset_profiles(ax: Axes, offsets: pd.DataFrame, layer: int, head: int, checkpoints: Sequence[str],
                    max_offset: int | None = None) -> Axes:
    """A head's mean attention by relative offset (how many tokens back), one line per checkpoint."""
    for name in checkpoints:
        rows = offsets[(offsets["checkpoint"] == name) & (offsets["layer"] == layer) & (offsets["head"] == head)]
        if max_offset is not None:
            rows = rows[rows["offset"] <= max_offset]
        ax.plot(rows["offset"], rows["value"], marker=".", ms=3, label=name)
    ax.set_title(head_name(layer, head))
    ax.set_xlabel("offset (key is this many tokens before the query)")
    ax.set_ylabel("mean attention weight")
    ax.set_xlim(left=-0.5)
    ax.set_ylim(bottom=0)
    ax.set_xticks(np.arange(0, ax.get_xlim()[1] + 1, 10))
    return ax
