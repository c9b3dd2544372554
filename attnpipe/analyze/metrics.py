"""Per-head attention metrics: pure functions on (layer, head, query, key) arrays.

Every metric is first a value per query row, then the mean over the query rows where it is
defined (NaN rows skipped), giving one number per (text, layer, head). Definitions, sources and
the handling of causal rows are in docs/METRICS.md; the short version is in `METRICS` below.

Keys a query "may see" (`visible_keys`): all n keys for a bidirectional encoder; keys j <= i for
a causal model. Causality is inferred from the data (every weight above the diagonal exactly 0
in every stored layer and head) unless the caller says so.

Example::

    from attnpipe.store import open_attention
    from attnpipe.analyze.metrics import corpus_metrics, aggregate
    with open_attention("results/demo/attention.h5") as f:
        long = corpus_metrics(f)            # text_id, layer, head, metric, value
    table = aggregate(long)                 # layer, head, metric, n_texts, mean, std, ci_low, ci_high
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
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_BOOTSTRAP_BLOCK = 100

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


def long_table(
    text_id: str,
    values: dict[str, np.ndarray],
    layers: Sequence[int],
    heads: Sequence[int],
) -> pd.DataFrame:
    """name -> (L, H) values as long rows: text_id, layer, head (model indices), metric, value."""
    names = list(values)
    stacked = np.stack([values[name] for name in names], axis=-1)  # (L, H, M)
    num_layers, num_heads, num_metrics = stacked.shape
    if (num_layers, num_heads) != (len(layers), len(heads)):
        raise AttnpipeError(
            f"attention has {num_layers} layers x {num_heads} heads but the file lists "
            f"layers {list(layers)} and heads {list(heads)}"
        )
    layer_idx, head_idx, metric_idx = np.meshgrid(
        np.arange(num_layers), np.arange(num_heads), np.arange(num_metrics), indexing="ij")
    return pd.DataFrame({
        "text_id": text_id,
        "layer": np.asarray(layers, dtype=np.int64)[layer_idx.ravel()],
        "head": np.asarray(heads, dtype=np.int64)[head_idx.ravel()],
        "metric": pd.Categorical(np.asarray(names)[metric_idx.ravel()], categories=names),
        "value": stacked.ravel(),
    })


def text_metrics(item, layers: Sequence[int], heads: Sequence[int], *, causal: bool | None = None,
                 metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table for one store.TextAttention; layers/heads are the file's stored model indices."""
    values = head_metrics(item.attention, item.tokens, item.special_tokens_mask, causal=causal, metrics=metrics)
    return long_table(item.id, values, layers, heads)


def corpus_metrics(attention_file, *, causal: bool | None = None,
                   metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Long table for every text of an open AttentionFile, read one text at a time."""
    names = check_metric_names(METRICS if metrics is None else metrics)
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    meta = attention_file.meta
    tables = [text_metrics(item, meta.layers, meta.heads, causal=causal, metrics=names)
              for item in attention_file]
    table = pd.concat(tables, ignore_index=True)
    table["metric"] = pd.Categorical(table["metric"].astype(str), categories=list(names))
    return table


# ----------------------------------------------------------------------------- corpus aggregates


def bootstrap_ci(
    values: np.ndarray,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval of the mean over texts, for many columns at once.

    values: (T, G) texts x groups, NaN = no value for that text. The same T-text resamples are
    used for every column (one seeded draw), so the result does not depend on column order.
    Returns (low, high), each (G,); NaN where a column has no finite value.
    """
    values = np.asarray(values, dtype=np.float64)
    num_texts = values.shape[0]
    rng = np.random.default_rng(seed)
    finite = np.isfinite(values)
    filled = np.where(finite, values, 0.0)
    means = np.empty((resamples, values.shape[1]))  # (B, G)
    for start in range(0, resamples, _BOOTSTRAP_BLOCK):  # blocks bound memory to (block, T)
        block = min(_BOOTSTRAP_BLOCK, resamples - start)
        draws = rng.integers(0, num_texts, size=(block, num_texts))  # (b, T)
        counts = np.zeros((block, num_texts))
        np.add.at(counts, (np.arange(block)[:, None], draws), 1.0)  # (b, T) times each text drawn
        with np.errstate(invalid="ignore", divide="ignore"):
            means[start:start + block] = (counts @ filled) / (counts @ finite)
    tail = (1.0 - confidence) / 2 * 100
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        low, high = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return low, high


def aggregate(
    long: pd.DataFrame,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    confidence: float = CONFIDENCE,
) -> pd.DataFrame:
    """Per (layer, head, metric) over texts: n_texts, mean, std (ddof 1), ci_low, ci_high, label.

    `label` is the positional label ("local"/"global") on local_share rows, empty elsewhere.
    """
    wide = long.pivot_table(index="text_id", columns=["layer", "head", "metric"], values="value",
                            aggfunc="first", dropna=False, observed=True)  # (T, G)
    values = wide.to_numpy(dtype=np.float64)
    low, high = bootstrap_ci(values, resamples=resamples, seed=seed, confidence=confidence)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        table = pd.DataFrame({
            "n_texts": np.isfinite(values).sum(0),
            "mean": np.nanmean(values, axis=0),
            "std": np.nanstd(values, axis=0, ddof=1),
            "ci_low": low,
            "ci_high": high,
        }, index=wide.columns).reset_index()
    table["metric"] = table["metric"].astype(str)
    metric_dtype = long["metric"].dtype
    order = list(metric_dtype.categories) if isinstance(metric_dtype, pd.CategoricalDtype) \
        else list(pd.unique(long["metric"]))
    table["_order"] = table["metric"].map({name: i for i, name in enumerate(order)})
    table["label"] = ""
    local = table["metric"] == "local_share"
    table.loc[local, "label"] = [positional_label(v) for v in table.loc[local, "mean"]]
    table = table.sort_values(["layer", "head", "_order"], kind="stable").drop(columns="_order")
    return table.reset_index(drop=True)


def positional_label(local_share: float) -> str:
    """"local" when at least LOCAL_LABEL_THRESHOLD of the weight lies within LOCAL_WINDOW, else "global"."""
    if not np.isfinite(local_share):
        return ""
    return "local" if local_share >= LOCAL_LABEL_THRESHOLD else "global"


SUMMARY_COLUMNS = {  # seed 000's printed names -> our metrics
    "Avg entropy": "entropy",
    "Avg max attention": "max_attention",
    "Diagonal strength": "self",
}


def layer_summary(long: pd.DataFrame) -> pd.DataFrame:
    """Seed 000's summary per layer: mean over heads and texts of entropy, max attention, self."""
    wanted = long[long["metric"].astype(str).isin(SUMMARY_COLUMNS.values())]
    table = wanted.pivot_table(index="layer", columns="metric", values="value", aggfunc="mean",
                               observed=True)
    heads = long.groupby("layer")["head"].nunique()
    out = pd.DataFrame({"num_heads": heads})
    for label, name in SUMMARY_COLUMNS.items():
        out[label] = table[name] if name in table else np.nan
    return out
