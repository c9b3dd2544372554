"""Stage 2 of --attribution ig (Hao et al. 2021): head importance by attribution, the attribution
tree, and the flow (Sankey) view of attention or attribution between tokens across layers.

Pure functions on the arrays of one text (attnpipe.store.TextAttention), returning long tables.
Sizes come from the data; layers and heads are *model* indices (the file's `layers`, `heads`).

- Head importance (the paper's §4.1): I_h = mean over texts of max_{q,k} Attr_h(A)[q, k].
- Attribution tree (the paper's §5, Algorithm 1): per stored layer l, the attribution summed over
  the stored heads, S^l = Σ_h Attr_h, normalised by its largest entry; an edge key k -> query q
  in layer l (the representation of token k below layer l feeds token q above it) when
  S^l[q, k] / max S^l > τ (the paper's τ = 0.4). `connected_edges` keeps the edges that reach the
  root (the [CLS] row, or the last token for causal models) at the top layer, walking down: a
  token stays reachable below a layer when it is reachable above it (the residual stream) or is
  the key of a kept edge into a reachable query.
- Flow view: per layer, an (n, n) weight matrix (attention: mean over heads; attribution: S^l
  normalised as above, negatives dropped), its strongest edges per query, and the hubs of seed
  002: the tokens most flowed into, by the column sums Σ_q W[q, k].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from attnpipe.errors import AttnpipeError

DEFAULT_THRESHOLD = 0.4  # the paper's τ for the attribution tree
FlowValues = Literal["attention", "attribution"]


def require_attribution(path, item) -> np.ndarray:
    """The text's attention_attribution (L, H, n, n), or one clear error."""
    if item.attention_attribution is None:
        raise AttnpipeError(f"{path} holds no attention attribution: extract it with "
                            "--explain T --attribution ig")
    return item.attention_attribution


def head_scores(item, layers: Sequence[int], heads: Sequence[int]) -> pd.DataFrame:
    """One row per (layer, head) of one text: max_attribution (the paper's per-text score) and
    sum_attribution (Σ over the head's matrix; a layer's sum over all heads is F(A) − F(0) − gap)."""
    attr = item.attention_attribution  # (L, H, n, n)
    num_layers, num_heads = attr.shape[:2]
    flat = attr.reshape(num_layers, num_heads, -1)
    return pd.DataFrame({
        "text_id": item.id,
        "layer": np.repeat(np.asarray(layers), num_heads),
        "head": np.tile(np.asarray(heads), num_layers),
        "max_attribution": flat.max(-1).ravel().astype(np.float64) if flat.shape[-1] else np.nan,
        "sum_attribution": flat.sum(-1, dtype=np.float64).ravel(),
    })


def head_importance(scores: pd.DataFrame) -> pd.DataFrame:
    """Per (layer, head): importance = mean over texts of max_attribution, and its rank (1 = most)."""
    table = (scores.groupby(["layer", "head"], sort=True)
             .agg(importance=("max_attribution", "mean"), sum_attribution_mean=("sum_attribution", "mean"),
                  texts=("text_id", "size"))
             .reset_index())
    table["rank"] = table["importance"].rank(ascending=False, method="first").astype(int)
    return table


def completeness(item, layers: Sequence[int]) -> pd.DataFrame:
    """Per stored layer of one text: delta = F(A) − F(0), gap = Σ Attr − delta, and gap / |F|."""
    value = item.gradient_target_value
    return pd.DataFrame({
        "text_id": item.id, "layer": list(layers),
        "delta": np.asarray(item.attribution_delta, np.float64),
        "gap": np.asarray(item.attribution_gap, np.float64),
        "relative_gap": np.asarray(item.attribution_gap, np.float64) / (abs(value) if value else np.nan),
    })


def layer_scores(attribution: np.ndarray) -> np.ndarray:
    """(L, n, n): each layer's attribution summed over heads, divided by its largest entry."""
    summed = attribution.sum(axis=1, dtype=np.float64)  # (L, n, n)
    top = summed.reshape(len(summed), -1).max(-1) if summed.size else np.zeros(len(summed))
    return summed / np.where(top > 0, top, 1.0)[:, None, None]


def tree_edges(attribution: np.ndarray, tokens: Sequence[str], layers: Sequence[int],
               threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Every edge key -> query of every stored layer whose normalised score exceeds `threshold`."""
    if not 0 <= threshold < 1:
        raise AttnpipeError(f"--threshold must be in [0, 1), got {threshold}")
    scores = layer_scores(attribution)
    rows = []
    for pos, layer in enumerate(layers):
        queries, keys = np.nonzero(scores[pos] > threshold)
        for q, k in zip(queries.tolist(), keys.tolist()):
            rows.append((int(layer), k, tokens[k], q, tokens[q], float(scores[pos, q, k])))
    return pd.DataFrame(rows, columns=["layer", "from_position", "from_token", "to_position", "to_token", "score"])


def connected_edges(edges: pd.DataFrame, layers: Sequence[int], root: int) -> pd.DataFrame:
    """The edges on a path to token `root` above the top stored layer (see the module docstring)."""
    reachable = {root}
    kept = []
    for layer in sorted(layers, reverse=True):
        here = edges[(edges["layer"] == layer) & edges["to_position"].isin(reachable)]
        kept.append(here)
        reachable |= set(here["from_position"].tolist())
    if not kept:
        return edges.iloc[:0]
    return pd.concat(kept[::-1], ignore_index=True)


def flow_weights(item, values: FlowValues = "attention") -> np.ndarray:
    """(L, n, n) weights of the flow view: attention averaged over heads, or normalised attribution."""
    if values == "attention":
        return item.attention.mean(axis=1, dtype=np.float64)
    if item.attention_attribution is None:
        raise AttnpipeError("--values attribution needs a file extracted with --explain T --attribution ig")
    return np.clip(layer_scores(item.attention_attribution), 0.0, None)


def flow_edges(weights: np.ndarray, tokens: Sequence[str], layers: Sequence[int], top_k: int = 2) -> pd.DataFrame:
    """Each query's `top_k` strongest keys per layer: layer, from (key), to (query), weight."""
    if top_k < 1:
        raise AttnpipeError(f"--top-k must be at least 1, got {top_k}")
    rows = []
    for pos, layer in enumerate(layers):
        w = weights[pos]  # (n, n)
        for q in range(w.shape[0]):
            for k in np.argsort(-w[q], kind="stable")[:top_k].tolist():
                if w[q, k] > 0:
                    rows.append((int(layer), k, tokens[k], q, tokens[q], float(w[q, k])))
    return pd.DataFrame(rows, columns=["layer", "from_position", "from_token", "to_position", "to_token", "weight"])


def hubs(weights: np.ndarray, tokens: Sequence[str], layers: Sequence[int], text_id: str,
         count: int = 3) -> pd.DataFrame:
    """Seed 002's attention hubs per layer: the `count` tokens with the largest inflow Σ_q W[q, k]
    (with row-normalised attention, inflow / n is the share of the layer's attention a token gets)."""
    rows = []
    for pos, layer in enumerate(layers):
        inflow = weights[pos].sum(axis=0)  # (n,) over queries
        for rank, k in enumerate(np.argsort(-inflow, kind="stable")[:count].tolist(), start=1):
            rows.append((text_id, int(layer), rank, k, tokens[k], float(inflow[k]),
                         float(inflow[k] / inflow.sum()) if inflow.sum() else np.nan))
    return pd.DataFrame(rows, columns=["text_id", "layer", "rank", "position", "token", "inflow", "share"])
