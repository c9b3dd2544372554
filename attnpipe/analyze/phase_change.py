"""Circuits over training: the detectors per checkpoint, the phase change, the heads that moved.

Pure functions on the tables of attnpipe.analyze.circuits (one attention file per checkpoint, the
same probe texts) and on a run's in-context loss table (scripts/train_induction.py writes one:
step, loss_first, loss_repeat, in_context_loss). Checkpoints are named and placed on axes by their
training step, read from the model folder each file was extracted from (`checkpoint-N`) unless the
caller gives the steps.

The phase change is the interval between two consecutive saved checkpoints where the in-context
loss falls most (without a loss table: where the largest induction score of any head rises most).
The heads that changed most around it are those whose attention moved most over that interval (the
Jensen-Shannon distance of attnpipe.analyze.compare); `describe` says it in words, from the numbers.

    steps = checkpoint_steps(paths, [f.meta for f in files])
    summary, offsets = detectors_by_checkpoint(files, steps)
    change = find_phase_change(summary, loss)          # PhaseChange(before, after, ...)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attnpipe.analyze import circuits as C
from attnpipe.errors import AttnpipeError

LOSS_COLUMNS = ("step", "loss_first", "loss_repeat", "in_context_loss")
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")  # HF Trainer's and scripts/train_induction.py's name


def checkpoint_steps(paths: Sequence[Path], metas: Sequence, steps: Sequence[int] | None = None) -> list[int | None]:
    """The training step of each file: given, else N of the `checkpoint-N` model folder it was
    extracted from, else None (then the checkpoint is known by its file name only)."""
    if steps is not None:
        if len(steps) != len(paths):
            raise AttnpipeError(f"--steps gives {len(steps)} step(s) for {len(paths)} file(s)")
        return list(steps)
    found = []
    for meta in metas:
        match = CHECKPOINT_FOLDER.fullmatch(Path(meta.model).name)
        found.append(int(match.group(1)) if match else None)
    return found


def checkpoint_names(paths: Sequence[Path], steps: Sequence[int | None]) -> list[str]:
    """'step N' where the step is known, else the file's name without its suffix."""
    return [f"step {s}" if s is not None else Path(p).stem for p, s in zip(paths, steps, strict=True)]


def detectors_by_checkpoint(files: Sequence, steps: Sequence[int | None], names: Sequence[str],
                            max_offset: int = 64) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(long detector rows, per-head summary, offset profiles), each with checkpoint, step columns.

    summary: checkpoint, step, layer, head, metric, mean (over texts), chance (the mean over the
    same texts of a uniform head's score). offsets: checkpoint, step, layer, head, offset, value."""
    longs, summaries, profiles = [], [], []
    for f, step, name in zip(files, steps, names, strict=True):
        long, offsets = C.corpus_detectors(f, max_offset=max_offset)
        chance = pd.DataFrame([{"text_id": item_id, "metric": metric, "chance": value}
                               for item_id, values in corpus_chance(f).items() for metric, value in values.items()])
        summary = (long.groupby(["layer", "head", "metric"], observed=True)["value"].mean()
                   .rename("mean").reset_index())
        summary["metric"] = summary["metric"].astype(str)
        summary = summary.merge(chance.groupby("metric")["chance"].mean().reset_index(), on="metric")
        order = summary["metric"].map({m: i for i, m in enumerate(C.DETECTORS)})
        summary = summary.iloc[np.lexsort((order, summary["head"], summary["layer"]))]
        for table in (long, summary, offsets):
            table.insert(0, "step", step)
            table.insert(0, "checkpoint", name)
        longs.append(long)
        summaries.append(summary)
        profiles.append(offsets)
    return (pd.concat(longs, ignore_index=True), pd.concat(summaries, ignore_index=True),
            pd.concat(profiles, ignore_index=True))


def corpus_chance(f) -> dict[str, dict[str, float]]:
    """text id -> each detector's chance level on that text (a uniform causal head)."""
    return {item.id: C.chance_scores(item.token_ids, causal=True) for item in f}


def read_loss_table(path: Path) -> pd.DataFrame:
    """A run's in_context_loss.csv (scripts/train_induction.py): step, loss_first, loss_repeat,
    in_context_loss; one row per saved checkpoint."""
    if not Path(path).is_file():
        raise AttnpipeError(f"--in-context-loss {path}: file not found")
    try:
        table = pd.read_csv(path)
    except (OSError, ValueError) as err:
        raise AttnpipeError(f"--in-context-loss {path}: cannot read it as CSV ({err})") from None
    missing = [c for c in LOSS_COLUMNS if c not in table.columns]
    if missing:
        raise AttnpipeError(f"--in-context-loss {path} lacks column(s) {', '.join(missing)} "
                            f"(expected {', '.join(LOSS_COLUMNS)})")
    return table[list(LOSS_COLUMNS)]


def losses_at(loss: pd.DataFrame, steps: Sequence[int | None], source: Path) -> pd.DataFrame:
    """The loss rows of the files' steps, in file order; every step must be in the table."""
    if any(s is None for s in steps):
        raise AttnpipeError("--in-context-loss needs the training step of every file: give --steps "
                            "(the files' model folders are not named checkpoint-N)")
    by_step = loss.drop_duplicates("step", keep="last").set_index("step")
    absent = [s for s in steps if s not in by_step.index]
    if absent:
        raise AttnpipeError(f"--in-context-loss {source} has no row for step(s) {', '.join(map(str, absent))}")
    return by_step.loc[list(steps)].reset_index()


@dataclass(frozen=True)
class PhaseChange:
    """The interval between checkpoints `before` and `after` (positions in file order)."""

    before: int
    after: int
    measure: str  # "in_context_loss" or "induction"
    start: float  # the measure at `before`
    end: float  # the measure at `after`


def find_phase_change(summary: pd.DataFrame, names: Sequence[str], loss: pd.DataFrame | None) -> PhaseChange:
    """The consecutive pair of checkpoints where in-context loss falls most, or (no loss table)
    where the largest induction score of any head rises most."""
    if len(names) < 2:
        raise AttnpipeError("a phase change needs at least two checkpoints")
    if loss is not None:
        values = loss["in_context_loss"].to_numpy(dtype=np.float64)
        k = int(np.argmin(np.diff(values))) + 1  # the largest fall
        return PhaseChange(k - 1, k, "in_context_loss", float(values[k - 1]), float(values[k]))
    induction = summary[summary["metric"] == "induction"]
    best = induction.groupby("checkpoint", sort=False)["mean"].max().reindex(list(names)).to_numpy()
    k = int(np.nanargmax(np.diff(best))) + 1  # the largest rise
    return PhaseChange(k - 1, k, "induction", float(best[k - 1]), float(best[k]))


def changed_heads(summary: pd.DataFrame, distances: pd.DataFrame, names: Sequence[str],
                  change: PhaseChange, top: int) -> pd.DataFrame:
    """The `top` heads whose attention moved most over the phase change (JS distance between the
    two checkpoints), with each detector's score before and after: one row per head."""
    moved = distances[distances["checkpoint"] == change.after][["layer", "head", "js_to_previous"]]
    before = summary[summary["checkpoint"] == names[change.before]]
    after = summary[summary["checkpoint"] == names[change.after]]
    wide = []
    for frame, suffix in ((before, "before"), (after, "after")):
        w = frame.pivot_table(index=["layer", "head"], columns="metric", values="mean", observed=True)
        w.columns = [f"{c}_{suffix}" for c in w.columns]
        wide.append(w)
    table = moved.set_index(["layer", "head"]).join(wide[0]).join(wide[1]).reset_index()
    table = table.sort_values("js_to_previous", ascending=False, kind="stable").head(top)
    table.insert(0, "name", [C.head_name(layer, head) for layer, head in zip(table["layer"], table["head"], strict=True)])
    return table.reset_index(drop=True)


def profile_peak(offsets: pd.DataFrame, checkpoint: str, layer: int, head: int) -> tuple[int, float]:
    """(offset, mean weight) where a head's profile at a checkpoint is highest."""
    rows = offsets[(offsets["checkpoint"] == checkpoint) & (offsets["layer"] == layer) & (offsets["head"] == head)]
    best = rows.loc[rows["value"].idxmax()]
    return int(best["offset"]), float(best["value"])


def describe(change: PhaseChange, names: Sequence[str], heads: pd.DataFrame, offsets: pd.DataFrame,
             summary: pd.DataFrame, loss: pd.DataFrame | None) -> list[str]:
    """Sentences saying what happened and when, every number read from the tables."""
    before, after = names[change.before], names[change.after]
    lines = []
    if loss is not None:
        icl = loss["in_context_loss"].to_numpy()
        lines.append(f"In-context loss (loss on the repeated half minus the first half) was {icl[0]:+.2f} nats at "
                     f"{names[0]} and {icl[-1]:+.2f} at {names[-1]}. It fell most between {before} and {after}: "
                     f"from {change.start:+.2f} to {change.end:+.2f} nats ({change.end - change.start:+.2f}); "
                     f"over the same interval the loss on the repeated half went from "
                     f"{loss['loss_repeat'].iloc[change.before]:.2f} to {loss['loss_repeat'].iloc[change.after]:.2f} "
                     f"nats and on the first half from {loss['loss_first'].iloc[change.before]:.2f} to "
                     f"{loss['loss_first'].iloc[change.after]:.2f}.")
    else:
        lines.append(f"Without a loss table, the phase change is taken where the highest induction score of any "
                     f"head rose most: between {before} and {after}, from {change.start:.2f} to {change.end:.2f}.")
    top_induction = summary[(summary["metric"] == "induction") & (summary["checkpoint"] == names[-1])]
    best = top_induction.loc[top_induction["mean"].idxmax()]
    lines.append(f"At {names[-1]} the strongest induction score is {C.head_name(best['layer'], best['head'])}'s, "
                 f"{best['mean']:.2f}, {best['mean'] / best['chance']:.1f} times what a uniform head scores on "
                 f"these texts ({best['chance']:.2f}); a perfect induction head scores 1.")
    for row in heads.itertuples(index=False):
        moves = [(m, getattr(row, f"{m}_before"), getattr(row, f"{m}_after")) for m in C.DETECTORS]
        metric, start, end = max(moves, key=lambda m: abs(m[2] - m[1]))
        others = ", ".join(f"{m} {s:.2f} → {e:.2f}" for m, s, e in moves if m != metric)
        offset, weight = profile_peak(offsets, after, row.layer, row.head)
        lines.append(f"{row.name} changed its attention by a JS distance of {row.js_to_previous:.2f} over "
                     f"{before} → {after}; its largest detector move is {metric} {start:.2f} → {end:.2f} "
                     f"({others}). At {after} its offset profile peaks at offset {offset} "
                     f"(mean weight {weight:.2f} on the key {offset} token(s) back).")
    return lines


def markdown(title: str, inputs: Sequence[Path], names: Sequence[str], summary: pd.DataFrame,
             heads: pd.DataFrame | None, words: Sequence[str], figures: dict[str, str],
             loss: pd.DataFrame | None) -> str:
    """circuits.md: what happened (words), the figures, the per-checkpoint tables."""
    from attnpipe.analyze.report import markdown_table

    out = [f"# {title}\n"]
    if words:
        out.append("## What happened\n")
        out += [f"- {line}" for line in words]
        out.append("")
    for caption, path in figures.items():
        out.append(f"![{caption}]({path})\n")
    out.append("## Checkpoints\n")
    table = pd.DataFrame({"checkpoint": list(names), "file": [f"`{p}`" for p in inputs]})
    if loss is not None:
        table = pd.concat([table, loss[["loss_first", "loss_repeat", "in_context_loss"]].reset_index(drop=True)], axis=1)
    out.append(markdown_table(table) + "\n")
    if heads is not None:
        out.append("## Heads that changed most around the phase change\n")
        out.append(markdown_table(heads.drop(columns=["layer", "head"])) + "\n")
    out.append("## Detector scores per head (mean over the probe texts)\n")
    wide = summary.pivot_table(index=["layer", "head"], columns=["metric", "checkpoint"], values="mean",
                               observed=True, sort=False)
    for metric in C.DETECTORS:
        if metric not in wide.columns.get_level_values(0):
            continue
        part = wide[metric][list(names)].reset_index()
        part.insert(0, "head", [C.head_name(layer, head) for layer, head in zip(part.pop("layer"), part.pop("head"), strict=True)])
        chance = summary[summary["metric"] == metric].groupby("checkpoint", sort=False)["chance"].first()
        out.append(f"### {metric}\n\nA head attending uniformly scores {chance.min():.3f}–{chance.max():.3f} "
                   "on these texts.\n")
        out.append(markdown_table(part) + "\n")
    out.append("Definitions: docs/METRICS.md, \"Circuit detectors\".\n")
    return "\n".join(out)
