"""The reference definition of every per-head metric, in numpy float64: the test oracle.

Every metric is first a value per query row, then the mean over the query rows where it is
defined (NaN rows skipped), giving one number per (text, layer, head). Definitions, sources and
the handling of causal rows are in docs/METRICS.md; the short version is in `METRICS` below.

Keys a query "may see" (`visible_keys`): all n keys for a bidirectional encoder; keys j <= i for
a causal model. Causality is inferred from the data (every weight above the diagonal exactly 0
in every stored layer and head) unless the caller says so.

Nothing in the pipeline computes metrics with `row_metrics`, `head_metrics` or `corpus_metrics`
of this module: every subcommand and library caller goes through attnpipe.analyze.metrics, whose
values come from the torch implementation (attnpipe.analyze.fast_metrics). These functions are
written for clarity, one text at a time, and the tests hold the fast path to them (agreement to
~1e-6 relative: the fast path computes rows in float32). The names, thresholds and key rules
above the metrics (`METRICS`, `infer_causal`, `sep_eos_keys`, ...) are shared by both.

    from attnpipe.analyze import metric_reference as R
    want = R.head_metrics(attention, tokens, special_tokens_mask)   # name -> (L, H)
"""

from __future__ import annotations

import unicodedata
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from attnpipe.errors import AttnpipeError

# Named thresholds (docs/METRICS.md says why each value).
SPARSITY_THRESHOLD = 0.01  # a weight below this counts as "unused" in `sparsity`
LOCAL_WINDOW = 2  # keys within |i - j| <= LOCAL_WINDOW of the query count as local
LOCAL_LABEL_THRESHOLD = 0.5  # a head whose mean local share reaches this is labelled "local"

# Token strings that end a segment or sequence, for files without a special-tokens mask
# (seed 001's JSON). With a mask, every special token after position 0 also counts.
SEP_EOS_TOKENS = frozenset({"[SEP]", "</s>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|end_of_text|>"})
SUBWORD_MARKERS = ("##", "Ġ", "▁")  # WordPiece continuation, byte-level BPE space, SentencePiece space

LONG_COLUMNS = ("text_id", "layer", "head", "metric", "value")


@dataclass(frozen=True)
class Metric:
    name: str
    unit: str
    description: str


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("entropy", "nats", "-sum_j a_ij ln a_ij over visible keys, mean over queries"),
    Metric("normalized_entropy", "0-1", "entropy / ln(number of visible keys); rows with one visible key skipped"),
    Metric("max_attention", "weight", "max_j a_ij (Voita et al. 2019 'confidence'), mean over queries"),
    Metric("self", "weight", "a_ii: attention of a token to itself (diagonal strength)"),
    Metric("previous_token", "weight", "a_i,i-1: query attends to the token before it; rows i >= 1"),
    Metric("next_token", "weight", "a_i,i+1: query attends to the token after it; rows where i+1 is visible"),
    Metric("first_token", "weight", "a_i,0: attention to position 0 ([CLS], <s>, BOS)"),
    Metric("sep_eos", "weight", "sum of a_ij over [SEP]/EOS keys j > 0 (Clark et al. 2019)"),
    Metric("punctuation", "weight", "sum of a_ij over punctuation keys (Clark et al. 2019)"),
    Metric("mean_distance", "tokens", "sum_j a_ij |i - j|: expected distance to the attended key"),
    Metric("sparsity", "share", f"share of visible keys with a_ij < {SPARSITY_THRESHOLD}"),
    Metric("local_share", "weight", f"sum of a_ij over keys with |i - j| <= {LOCAL_WINDOW}"),
)}


# ----------------------------------------------------------------------------- keys and tokens


def infer_causal(attention: np.ndarray) -> bool:
    """True when every weight above the diagonal is exactly 0 in every layer and head.

    attention: (..., n, n). A one-token text is bidirectional by convention (nothing to tell).
    """
    n = attention.shape[-1]
    if n < 2:
        return False
    if np.any(attention[..., 0, 1:]):  # the first query's later keys: settles most bidirectional texts at once
        return False
    upper = np.triu(np.ones((n, n), dtype=bool), k=1)
    return bool(np.all(attention[..., upper] == 0))


def visible_keys(n: int, causal: bool) -> np.ndarray:
    """(n, n) bool: entry (i, j) is True when query i may attend to key j."""
    if causal:
        return np.tril(np.ones((n, n), dtype=bool))
    return np.ones((n, n), dtype=bool)


def is_punctuation(token: str) -> bool:
    """A token made only of Unicode punctuation (category P*), after removing sub-word markers."""
    for marker in SUBWORD_MARKERS:
        if token.startswith(marker):
            token = token[len(marker):]
    return bool(token) and all(unicodedata.category(ch).startswith("P") for ch in token)


def sep_eos_keys(tokens: Sequence[str], special_tokens_mask: np.ndarray | None) -> np.ndarray:
    """(n,) bool: keys after position 0 that are special tokens or spelled like [SEP] / EOS."""
    n = len(tokens)
    by_name = np.array([tok in SEP_EOS_TOKENS for tok in tokens], dtype=bool)
    special = np.zeros(n, dtype=bool) if special_tokens_mask is None else np.asarray(special_tokens_mask, bool)
    keys = by_name | special
    keys[:1] = False  # position 0 is `first_token`'s, never counted twice
    return keys


def punctuation_keys(tokens: Sequence[str], special_tokens_mask: np.ndarray | None) -> np.ndarray:
    """(n,) bool: punctuation tokens that are not special tokens."""
    keys = np.array([is_punctuation(tok) for tok in tokens], dtype=bool)
    if special_tokens_mask is not None:
        keys &= ~np.asarray(special_tokens_mask, bool)
    return keys


# ----------------------------------------------------------------------------- metrics


def check_metric_names(names: Iterable[str]) -> tuple[str, ...]:
    names = tuple(names)
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise AttnpipeError(
            f"unknown metric(s) {', '.join(unknown)}: choose from {', '.join(METRICS)}"
        )
    return names


def row_metrics(
    attention: np.ndarray,
    tokens: Sequence[str],
    special_tokens_mask: np.ndarray | None = None,
    *,
    causal: bool | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Each metric per query row: name -> (L, H, n) float64, NaN where undefined for that row.

    attention: (L, H, n, n) probabilities, rows = queries. tokens and special_tokens_mask: (n,).
    """
    names = check_metric_names(METRICS if metrics is None else metrics)
    a = np.asarray(attention, dtype=np.float64)  # (L, H, n, n); float64 so 0·ln 0 and sums are exact enough
    n = a.shape[-1]
    if a.ndim != 4 or a.shape[-2] != n:
        raise AttnpipeError(f"attention has shape {a.shape}; expected (layer, head, n, n)")
    if len(tokens) != n:
        raise AttnpipeError(f"{len(tokens)} tokens but attention is {n} x {n}")
    causal = infer_causal(a) if causal is None else causal
    visible = visible_keys(n, causal)  # (n, n)
    num_visible = visible.sum(-1)  # (n,)
    a = np.where(visible, a, 0.0)  # weights a query may not see do not count
    positions = np.arange(n)
    distance = np.abs(positions[:, None] - positions[None, :])  # (n, n)
    nan_row = np.full(a.shape[:-1], np.nan)  # (L, H, n)

    def neighbour(offset: int) -> np.ndarray:  # a[i, i + offset] where that key is visible, else NaN
        out = nan_row.copy()
        rows = positions[(positions + offset >= 0) & (positions + offset < n)]
        rows = rows[visible[rows, rows + offset]]
        out[..., rows] = a[..., rows, rows + offset]
        return out

    def entropy() -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(a > 0, -a * np.log(np.where(a > 0, a, 1.0)), 0.0)
        return terms.sum(-1)

    def normalized_entropy() -> np.ndarray:
        out = nan_row.copy()
        rows = num_visible > 1  # one visible key: no choice, so no entropy to normalise
        out[..., rows] = entropy()[..., rows] / np.log(num_visible[rows])
        return out

    compute = {
        "entropy": entropy,
        "normalized_entropy": normalized_entropy,
        "max_attention": lambda: a.max(-1),
        "self": lambda: np.diagonal(a, axis1=-2, axis2=-1).copy(),
        "previous_token": lambda: neighbour(-1),
        "next_token": lambda: neighbour(+1),
        "first_token": lambda: a[..., 0].copy(),
        "sep_eos": lambda: a[..., sep_eos_keys(tokens, special_tokens_mask)].sum(-1),
        "punctuation": lambda: a[..., punctuation_keys(tokens, special_tokens_mask)].sum(-1),
        "mean_distance": lambda: (a * distance).sum(-1),
        "sparsity": lambda: ((a < SPARSITY_THRESHOLD) & visible).sum(-1) / num_visible,
        "local_share": lambda: (a * (distance <= LOCAL_WINDOW)).sum(-1),
    }
    return {name: compute[name]() for name in names}


def head_metrics(
    attention: np.ndarray,
    tokens: Sequence[str],
    special_tokens_mask: np.ndarray | None = None,
    *,
    causal: bool | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Each metric per head: name -> (L, H), the mean over the query rows where it is defined."""
    rows = row_metrics(attention, tokens, special_tokens_mask, causal=causal, metrics=metrics)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all rows undefined -> NaN, on purpose
        return {name: np.nanmean(values, axis=-1) for name, values in rows.items()}


def corpus_metrics(attention_file, *, causal: bool | None = None,
                   metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """The long table (text_id, layer, head, metric, value) of every text of an open AttentionFile,
    read and computed one text at a time in float64: what attnpipe.analyze.metrics.corpus_metrics
    must agree with."""
    from attnpipe import store

    names = check_metric_names(METRICS if metrics is None else metrics)
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    meta = attention_file.meta
    values = np.full((len(attention_file), len(meta.layers), len(meta.heads), len(names)), np.nan)
    for index, item in enumerate(attention_file):
        per_head = head_metrics(item.attention, item.tokens, item.special_tokens_mask, causal=causal, metrics=names)
        values[index] = np.stack([per_head[name] for name in names], axis=-1)  # (L, H, M)
    return store.metrics_table(attention_file.ids, meta.layers, meta.heads, names, values)
