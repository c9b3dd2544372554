"""Per-head attention metrics: one number per (text, layer, head, metric), as long tables.

Every subcommand and library caller computes metrics here, and here they have one
implementation: the torch one of attnpipe.analyze.fast_metrics (padded batches, worker
processes). The reference definition of each metric, in numpy float64, is
attnpipe.analyze.metric_reference: the tests hold this module to it. Definitions, sources and the
handling of causal rows are in docs/METRICS.md; the short version is in `METRICS`.

Example::

    from attnpipe.store import open_attention
    from attnpipe.analyze.metrics import corpus_metrics, aggregate
    with open_attention("results/demo/attention.h5") as f:
        long = corpus_metrics(f)            # text_id, layer, head, metric, value
    table = aggregate(long)                 # layer, head, metric, n_texts, mean, std, ci_low, ci_high
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnpipe.analyze.metric_reference import (  # noqa: F401 - the metric names and rules, re-exported
    LOCAL_LABEL_THRESHOLD,
    LOCAL_WINDOW,
    LONG_COLUMNS,
    METRICS,
    SEP_EOS_TOKENS,
    SPARSITY_THRESHOLD,
    SUBWORD_MARKERS,
    Metric,
    check_metric_names,
    infer_causal,
    is_punctuation,
    punctuation_keys,
    sep_eos_keys,
    visible_keys,
)
from attnpipe.errors import AttnpipeError

# Bootstrap defaults of `aggregate` (docs/METRICS.md).
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
_BOOTSTRAP_BLOCK = 100


def head_metrics(
    attention: np.ndarray,
    tokens: Sequence[str],
    special_tokens_mask: np.ndarray | None = None,
    *,
    causal: bool | None = None,
    metrics: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """Each metric per head of one text: name -> (L, H), the mean over the query rows where it is
    defined. attention: (L, H, n, n) probabilities, rows = queries; tokens, special mask: (n,)."""
    from attnpipe.analyze import fast_metrics  # torch: imported when metrics are computed

    names = check_metric_names(METRICS if metrics is None else metrics)
    values = fast_metrics.text_values(attention, tokens, special_tokens_mask, causal=causal, names=names)
    return {name: values[..., m] for m, name in enumerate(names)}  # (L, H) each


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
                   metrics: Sequence[str] | None = None, workers: int | None = None) -> pd.DataFrame:
    """Long table for every text of an open AttentionFile (text_id, layer, head, metric, value).

    Computed by attnpipe.analyze.fast_metrics.corpus_metrics: texts in padded torch batches, in
    `workers` processes (None: one per available core, fewer for a small corpus)."""
    from attnpipe.analyze import fast_metrics  # torch: imported when metrics are computed

    return fast_metrics.corpus_metrics(attention_file, causal=causal, metrics=metrics, workers=workers)


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
