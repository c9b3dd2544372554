"""Checkpoint comparison: the same texts under two or more checkpoints, head by head.

For each checkpoint k >= 1 and each head stored in every file, the Jensen-Shannon distance
(attnpipe.analyze.clustering.js_distance, base 2, in [0, 1]) between its attention rows and those of the
same head at checkpoint k-1 (`js_to_previous`) and at checkpoint 0 (`js_to_first`), averaged over
query rows and then over texts. Files must hold the same text ids with the same tokens (the same
tokenizer); otherwise a comparison is meaningless and an AttnpipeError says what differs.

Example::

    files = [open_attention(p) for p in ("step1000.h5", "step2000.h5", "final.h5")]
    table = checkpoint_distances(files)   # checkpoint, checkpoint_name, file, layer, head, js_to_previous, js_to_first
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from attnpipe.analyze.clustering import js_distance
from attnpipe.errors import AttnpipeError
from attnpipe.analyze.metrics import aggregate, corpus_metrics


def common_heads(files: Sequence) -> tuple[list[int], list[int]]:
    """Model layer and head indices stored in every file."""
    layers = sorted(set.intersection(*(set(f.meta.layers) for f in files)))
    heads = sorted(set.intersection(*(set(f.meta.heads) for f in files)))
    if not layers or not heads:
        raise AttnpipeError("the files share no stored (layer, head): "
                            + "; ".join(f"{f.path}: layers {list(f.meta.layers)}, heads {list(f.meta.heads)}"
                                        for f in files))
    return layers, heads


def check_same_texts(files: Sequence) -> None:
    """The files must hold the same set of text ids (any order)."""
    if len(files) < 2:
        raise AttnpipeError("a comparison needs at least two attention files")
    reference = files[0]
    if len(reference) == 0:
        raise AttnpipeError(f"{reference.path} holds no texts")
    for other in files[1:]:
        missing = sorted(set(reference.ids) - set(other.ids))
        extra = sorted(set(other.ids) - set(reference.ids))
        if missing or extra:
            detail = (f"{len(missing)} id(s) only in the first (e.g. {missing[0]!r})" if missing else
                      f"{len(extra)} id(s) only in the second (e.g. {extra[0]!r})")
            raise AttnpipeError(f"{reference.path} and {other.path} hold different texts: {detail}; "
                                "compare files extracted from the same texts")


def _positions(values: Sequence[int], wanted: Sequence[int]) -> list[int]:
    values = list(values)
    return [values.index(v) for v in wanted]


def checkpoint_names(files: Sequence) -> list[str]:
    """A short name per checkpoint file for axes and tables: the file names when they differ (the
    workflow writes {checkpoint}.h5: random, minilm, ft-10, ...; a user compares step1k.h5
    step2k.h5), else the model folder's name (step-1000, checkpoint-500, ...) with its parent
    folder when that alone is not unique, else the file path."""
    def tail(path: Path, depth: int) -> str:
        return "/".join(path.parts[-depth:])

    stems = [Path(f.path).stem for f in files]
    if len(set(stems)) == len(stems):
        return stems
    sources = [Path(f.meta.model) for f in files if f.meta.model != "unknown"]
    for paths in ([Path(f.meta.model) for f in files] if len(sources) == len(files) else [],
                  [Path(f.path).with_suffix("") for f in files]):
        for depth in (1, 2, 3):
            names = [tail(path, depth) for path in paths]
            if names and len(set(names)) == len(names):
                return names
    return [str(f.path) for f in files]


def checkpoint_distances(files: Sequence) -> pd.DataFrame:
    """Per checkpoint k >= 1 and common (layer, head): mean JS distance to checkpoint k-1 and to 0."""
    check_same_texts(files)
    layers, heads = common_heads(files)
    picks = [np.ix_(_positions(f.meta.layers, layers), _positions(f.meta.heads, heads)) for f in files]
    to_previous = np.zeros((len(files), len(layers), len(heads)))
    to_first = np.zeros_like(to_previous)
    for text_id in files[0].ids:
        items = [f[text_id] for f in files]
        for item in items[1:]:
            if item.tokens != items[0].tokens:
                raise AttnpipeError(f"text {text_id!r} is tokenized differently in {files[0].path} and "
                                    "another file: compare checkpoints that share a tokenizer")
        attention = [item.attention[pick] for item, pick in zip(items, picks, strict=True)]  # (L', H', n, n)
        for k in range(1, len(files)):
            to_previous[k] += js_distance(attention[k], attention[k - 1]).mean(-1)
            to_first[k] += js_distance(attention[k], attention[0]).mean(-1)
    count = len(files[0].ids)
    names = checkpoint_names(files)
    rows = []
    for k in range(1, len(files)):
        for li, layer in enumerate(layers):
            for hi, head in enumerate(heads):
                rows.append((k, names[k], str(files[k].path), layer, head,
                             to_previous[k, li, hi] / count, to_first[k, li, hi] / count))
    table = pd.DataFrame(rows, columns=["checkpoint", "checkpoint_name", "file", "layer", "head",
                                        "js_to_previous", "js_to_first"])
    table.attrs["checkpoint_names"] = names  # every checkpoint, the first (no row of its own) included
    return table


def metrics_by_checkpoint(files: Sequence, metrics: Sequence[str] | None = None, **aggregate_options) -> pd.DataFrame:
    """Every metric per checkpoint: the aggregate table of each file with checkpoint and file columns."""
    check_same_texts(files)
    tables = []
    for k, (f, name) in enumerate(zip(files, checkpoint_names(files), strict=True)):
        table = aggregate(corpus_metrics(f, metrics=metrics), **aggregate_options)
        table.insert(0, "file", str(f.path))
        table.insert(0, "checkpoint_name", name)
        table.insert(0, "checkpoint", k)
        tables.append(table)
    return pd.concat(tables, ignore_index=True)
