"""Head detectors of the induction-circuit literature, on stored attention: pure numpy functions.

Per head of one text (definitions and sources: docs/METRICS.md, "Circuit detectors"):

- previous_token   a_{i,i-1}, mean over the rows i >= 1 (the metric of the same name)
- duplicate_token  Σ a_ij over earlier keys j < i holding the same token as the query, mean
                   over the rows that have such a key (Olsson et al. 2022; TransformerLens)
- induction        Σ a_ij over keys j = p + 1 <= i right after an earlier occurrence p < i of the
                   query's token, mean over the rows that have such a key (Olsson et al. 2022)
- offset profile   a_{i,i-d} for each relative offset d = i - j, mean over the rows where key
                   i - d exists and is visible: one (head x offset) profile per text

Tokens are compared by id (the file's `token_ids`). Chance level: what a head attending
uniformly to its visible keys scores (`chance_scores`), the reference line of every detector.

    from attnpipe.analyze import circuits as C
    scores = C.detector_scores(attention, token_ids)          # name -> (L, H)
    profile = C.offset_profile(attention)                     # (L, H, D) offsets 0..D-1
    tl = scores["induction"] * C.defined_rows(token_ids)["induction"] / n   # TransformerLens's "mul"
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnpipe.analyze.metric_reference import infer_causal, visible_keys
from attnpipe.errors import AttnpipeError

DETECTORS = ("previous_token", "duplicate_token", "induction")
DETECTOR_UNITS = "weight"
DETECTOR_DESCRIPTIONS = {
    "previous_token": "a_i,i-1: query attends to the token before it; rows i >= 1",
    "duplicate_token": "sum of a_ij over earlier keys j < i with the query's token id; rows with such a key",
    "induction": "sum of a_ij over keys j = p+1 <= i after an earlier occurrence p < i of the query's token; "
                 "rows with such a key (Olsson et al. 2022)",
}


def detection_patterns(token_ids: Sequence[int], causal: bool = True) -> dict[str, np.ndarray]:
    """Each detector's (n, n) bool key set: entry (i, j) True when key j counts for query i.

    Only keys a query may see are ever set (keys j <= i for a causal model)."""
    ids = np.asarray(token_ids).reshape(-1)
    n = len(ids)
    visible = visible_keys(n, causal)  # (n, n)
    earlier = np.tril(np.ones((n, n), dtype=bool), k=-1)  # (n, n): j < i
    same = ids[:, None] == ids[None, :]  # (n, n): token i == token j
    duplicate = same & earlier  # earlier occurrences of the query's token
    induction = np.zeros((n, n), dtype=bool)
    induction[:, 1:] = duplicate[:, :-1]  # key p + 1 for every earlier occurrence p of token i
    previous = np.eye(n, k=-1, dtype=bool)  # key i - 1
    return {"previous_token": previous & visible, "duplicate_token": duplicate & visible,
            "induction": induction & visible}


def defined_rows(token_ids: Sequence[int], causal: bool = True) -> dict[str, int]:
    """Number of query rows on which each detector is defined (rows with at least one key)."""
    return {name: int(p.any(-1).sum()) for name, p in detection_patterns(token_ids, causal).items()}


def _checked(attention: np.ndarray, token_ids: Sequence[int]) -> np.ndarray:
    a = np.asarray(attention, dtype=np.float64)  # (L, H, n, n)
    if a.ndim != 4 or a.shape[-1] != a.shape[-2]:
        raise AttnpipeError(f"attention has shape {a.shape}; expected (layer, head, n, n)")
    if len(token_ids) != a.shape[-1]:
        raise AttnpipeError(f"{len(token_ids)} token ids but attention is {a.shape[-1]} x {a.shape[-1]}")
    return a


def detector_rows(attention: np.ndarray, token_ids: Sequence[int], *,
                  causal: bool | None = None) -> dict[str, np.ndarray]:
    """Each detector per query row: name -> (L, H, n), NaN on rows where it is undefined."""
    a = _checked(attention, token_ids)
    causal = infer_causal(a) if causal is None else causal
    out = {}
    for name, pattern in detection_patterns(token_ids, causal).items():
        rows = (a * pattern).sum(-1)  # (L, H, n): weight on the detector's keys
        out[name] = np.where(pattern.any(-1), rows, np.nan)
    return out


def detector_scores(attention: np.ndarray, token_ids: Sequence[int], *,
                    causal: bool | None = None) -> dict[str, np.ndarray]:
    """Each detector per head: name -> (L, H), the mean over the rows where it is defined
    (NaN when no row is: e.g. a text without a repeated token has no duplicate_token score)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # no defined row -> NaN, on purpose
        return {name: np.nanmean(rows, axis=-1)
                for name, rows in detector_rows(attention, token_ids, causal=causal).items()}


def chance_scores(token_ids: Sequence[int], causal: bool = True) -> dict[str, float]:
    """What a head spreading each row uniformly over its visible keys scores on this text: the
    mean over defined rows of (number of the detector's keys) / (number of visible keys)."""
    n = len(token_ids)
    visible = visible_keys(n, causal)
    uniform = (visible / visible.sum(-1, keepdims=True))[None, None]  # (1, 1, n, n)
    return {name: float(v[0, 0]) for name, v in
            detector_scores(uniform, token_ids, causal=causal).items()}


def offset_profile(attention: np.ndarray, max_offset: int | None = None) -> np.ndarray:
    """(L, H, D) mean of a_{i,i-d} over the rows i where key i - d exists and is visible, for
    d = 0 .. D-1 (D = max_offset + 1, default n): offset d is "d tokens back". NaN where no row has
    that offset. Bidirectional files: only the keys at or before the query are profiled (a causal
    model's rows see no other keys)."""
    a = np.asarray(attention, dtype=np.float64)  # (L, H, n, n)
    n = a.shape[-1]
    depth = n if max_offset is None else max_offset + 1
    profile = np.full(a.shape[:2] + (depth,), np.nan)
    for d in range(min(depth, n)):
        profile[..., d] = np.diagonal(a, offset=-d, axis1=-2, axis2=-1).mean(-1)  # rows i >= d
    return profile


def text_detectors(item, layers: Sequence[int], heads: Sequence[int], *,
                   causal: bool | None = None) -> pd.DataFrame:
    """Long rows (text_id, layer, head, metric, value) of the detectors of one store.TextAttention."""
    from attnpipe.analyze.metrics import long_table

    scores = detector_scores(item.attention, item.token_ids, causal=causal)
    return long_table(item.id, scores, layers, heads)


def corpus_detectors(attention_file, *, causal: bool | None = None,
                     max_offset: int = 64) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(detector long table over every text, offset profile per layer, head and offset).

    The profile is the mean over texts of each text's profile (texts shorter than an offset do not
    count for it): columns layer, head, offset, value, n_texts."""
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    meta = attention_file.meta
    frames, total, count = [], 0.0, 0
    for item in attention_file:
        frames.append(text_detectors(item, meta.layers, meta.heads, causal=causal))
        profile = offset_profile(item.attention, max_offset)  # (L, H, D)
        total = total + np.nan_to_num(profile)
        count = count + np.isfinite(profile)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count  # (L, H, D)
    num_layers, num_heads, depth = mean.shape
    layer_idx, head_idx, offset = np.meshgrid(np.arange(num_layers), np.arange(num_heads),
                                              np.arange(depth), indexing="ij")
    offsets = pd.DataFrame({
        "layer": np.asarray(meta.layers, dtype=np.int64)[layer_idx.ravel()],
        "head": np.asarray(meta.heads, dtype=np.int64)[head_idx.ravel()],
        "offset": offset.ravel(),
        "value": mean.ravel(),
        "n_texts": np.broadcast_to(count, mean.shape).ravel(),
    })
    return pd.concat(frames, ignore_index=True), offsets[offsets["n_texts"] > 0].reset_index(drop=True)


def head_name(layer: int, head: int) -> str:
    """The label of a head on axes and in the report: L{layer}.H{head} (model indices)."""
    return f"L{layer}.H{head}"
