"""Clark et al. 2019's conventions, to reproduce their numbers on our files (`analyze_attention.py clark`).

Our metrics (attnpipe.analyze.metric_reference) depart from the reference code of "What Does BERT
Look At?" (clarkkev/attention-analysis: General_Analysis.ipynb, head_distances.py) in five ways,
each listed with its converting factor in docs/METRICS.md ("Departures from Clark et al."). This
module computes their definitions on the same matrices, one text at a time, so a user can get
their numbers exactly:

- average attention per token kind (`average_attention`): Σ_i Σ_j a_ij s_ij / n for each selector
  s: self (j = i), left (j = i - 1), right (j = i + 1), [CLS] and [SEP] keys (by token string, at
  any position), punctuation keys ("." and "," only); the per-text value, averaged over texts.
- entropy (`entropy`): rows smoothed as 0.9999·a + 0.0001/n, -Σ a ln a per row, mean over rows.
- head distance (`js_divergence`): rows smoothed as 0.999·a + 0.001/n, the Jensen-Shannon
  divergence in nats per row, summed over rows (and over texts by the caller).

    from attnpipe.analyze import clark
    kinds = clark.average_attention(attention, tokens)     # kind -> (L, H)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

CLS, SEP = "[CLS]", "[SEP]"
PUNCTUATION = (".", ",")  # Clark et al.'s punctuation keys
ENTROPY_SMOOTHING = 1e-4  # a -> (1 - eps)·a + eps/n before the entropy
JS_SMOOTHING = 1e-3  # a -> (1 - eps)·a + eps/n before the JS divergence
KINDS = ("self", "left", "right", "cls", "sep", "punct")


def average_attention(attention: np.ndarray, tokens: Sequence[str]) -> dict[str, np.ndarray]:
    """Clark et al.'s per-text average attention to each kind of key: kind -> (L, H)."""
    a = np.asarray(attention, dtype=np.float64)  # (L, H, n, n)
    n = a.shape[-1]
    cls = np.array([t == CLS for t in tokens], dtype=float)  # a typed "[CLS]" counts too
    sep = np.array([t == SEP for t in tokens], dtype=float)
    punct = np.array([t in PUNCTUATION for t in tokens], dtype=float)
    selectors = {"self": np.eye(n), "left": np.eye(n, k=-1), "right": np.eye(n, k=1),
                 "cls": np.tile(cls, (n, 1)), "sep": np.tile(sep, (n, 1)), "punct": np.tile(punct, (n, 1))}
    return {kind: (a * s).sum((-1, -2)) / n for kind, s in selectors.items()}  # every kind divides by n


def entropy(attention: np.ndarray) -> np.ndarray:
    """(L, H): Clark et al.'s smoothed row entropy, mean over rows (nats)."""
    a = np.asarray(attention, dtype=np.float64)
    smoothed = (1 - ENTROPY_SMOOTHING) * a + ENTROPY_SMOOTHING / a.shape[-1]
    return -(smoothed * np.log(smoothed)).sum(-1).mean(-1)


def js_divergence(attention: np.ndarray) -> np.ndarray:
    """(L·H, L·H): Clark et al.'s head distance on one text: smoothed JS divergence (nats) between
    every two heads' rows, summed over the rows. Heads in (layer, head) order."""
    a = np.asarray(attention, dtype=np.float64)
    flat = a.reshape(-1, a.shape[-2], a.shape[-1])  # (L·H, n, n)
    smoothed = JS_SMOOTHING / flat.shape[-1] + (1 - JS_SMOOTHING) * flat
    p, q = smoothed[:, None], smoothed[None, :]  # (L·H, 1, n, n), (1, L·H, n, n)
    m = (p + q) / 2
    js = (p * np.log(p / m) + q * np.log(q / m)) / 2
    return js.sum((-1, -2))


def corpus_tables(attention_file) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per layer, head: Clark's kinds and entropy averaged over texts; head distances summed over
    texts as in head_distances.py, long: layer_a, head_a, layer_b, head_b, js_divergence)."""
    meta = attention_file.meta
    layers, heads = list(meta.layers), list(meta.heads)
    sums = {kind: 0.0 for kind in (*KINDS, "entropy")}
    distance = 0.0
    count = 0
    for item in attention_file:
        for kind, value in average_attention(item.attention, item.tokens).items():
            sums[kind] = sums[kind] + value
        sums["entropy"] = sums["entropy"] + entropy(item.attention)
        distance = distance + js_divergence(item.attention)
        count += 1
    layer_idx, head_idx = np.meshgrid(np.arange(len(layers)), np.arange(len(heads)), indexing="ij")
    per_head = pd.DataFrame({"layer": np.asarray(layers)[layer_idx.ravel()],
                             "head": np.asarray(heads)[head_idx.ravel()],
                             **{kind: (total / count).ravel() for kind, total in sums.items()}})
    pairs = [(layer, head) for layer in layers for head in heads]
    rows = [(*pairs[i], *pairs[j], distance[i, j]) for i in range(len(pairs)) for j in range(len(pairs))]
    distances = pd.DataFrame(rows, columns=["layer_a", "head_a", "layer_b", "head_b", "js_divergence"])
    return per_head, distances
