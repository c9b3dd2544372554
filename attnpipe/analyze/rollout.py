"""Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers").

Each layer's heads are fused into one (n, n) matrix, the residual connection is modelled as
`Â = 0.5·A + 0.5·I` with rows renormalised to sum to 1, and the layers are multiplied from the
start layer up, each new layer on the left:

    R = Â_last · ... · Â_start+1 · Â_start        # (n, n)

R[i, j] is how much of output position i (after the last layer) comes from input token j.

`discard_ratio` follows seed 004 (and the widely used vit-explain code): in each layer, after head
fusion, the smallest `floor(discard_ratio · n²)` weights of the fused matrix are set to 0 before
the residual mixing (vit-explain additionally spares the flattened entry 0, i.e. [CLS] → [CLS];
we spare nothing, the identity term keeps every row non-empty).

Example::

    from attnpipe.analyze.rollout import rollout
    joint = rollout(item.attention, head_fusion="mean")   # (n, n)
    cls_row = joint[0]                                     # what [CLS] gathers from each input token
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd

from attnpipe.errors import AttnpipeError

HeadFusion = Literal["mean", "max", "min"]
Query = Literal["cls", "last", "all"]
HEAD_FUSIONS: tuple[str, ...] = ("mean", "max", "min")
QUERY_CHOICES: tuple[str, ...] = ("cls", "last", "all")
RESIDUAL_WEIGHT = 0.5  # Abnar & Zuidema 2020: A_res = 0.5 A + 0.5 I (equal attention and skip paths)


def fuse_heads(attention: np.ndarray, head_fusion: HeadFusion = "mean") -> np.ndarray:
    """(L, H, n, n) -> (L, n, n): the mean, max or min over heads of each weight."""
    if head_fusion not in HEAD_FUSIONS:
        raise AttnpipeError(f"unknown head fusion {head_fusion!r}: choose from {', '.join(HEAD_FUSIONS)}")
    return getattr(np, head_fusion)(np.asarray(attention, dtype=np.float64), axis=1)


def discard_smallest(matrix: np.ndarray, discard_ratio: float) -> np.ndarray:
    """Copy of an (n, n) matrix with its floor(discard_ratio · n²) smallest entries set to 0."""
    if not 0.0 <= discard_ratio < 1.0:
        raise AttnpipeError(f"discard ratio must be in [0, 1), got {discard_ratio}")
    out = np.array(matrix, dtype=np.float64)
    count = int(np.floor(discard_ratio * out.size))
    if count:
        smallest = np.argsort(out, axis=None, kind="stable")[:count]
        out.flat[smallest] = 0.0
    return out


def add_residual(matrix: np.ndarray, residual_weight: float = RESIDUAL_WEIGHT) -> np.ndarray:
    """(…, n, n) -> (1 - w)·A + w·I, each row renormalised to sum to 1."""
    n = matrix.shape[-1]
    mixed = (1.0 - residual_weight) * matrix + residual_weight * np.eye(n)
    return mixed / mixed.sum(-1, keepdims=True)


def layer_matrices(attention: np.ndarray, head_fusion: HeadFusion = "mean",
                   discard_ratio: float = 0.0) -> np.ndarray:
    """(L, H, n, n) -> (L, n, n): fused, thinned and residual-mixed matrix of each layer."""
    fused = fuse_heads(attention, head_fusion)  # (L, n, n)
    thinned = np.stack([discard_smallest(layer, discard_ratio) for layer in fused]) if discard_ratio else fused
    return add_residual(thinned)


def rollout(attention: np.ndarray, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0,
            start: int = 0) -> np.ndarray:
    """(L, H, n, n) -> (n, n) rollout from stored layer position `start` to the last stored layer."""
    attention = np.asarray(attention)
    if attention.ndim != 4:
        raise AttnpipeError(f"attention has shape {attention.shape}; expected (layer, head, n, n)")
    num_layers, n = attention.shape[0], attention.shape[-1]
    if not 0 <= start < num_layers:
        raise AttnpipeError(f"start layer position {start} is out of range: {num_layers} layer(s) stored")
    mixed = layer_matrices(attention[start:], head_fusion, discard_ratio)  # (L - start, n, n)
    joint = np.eye(n)
    for layer in mixed:
        joint = layer @ joint  # (n, n): the later layer acts on what the earlier ones gathered
    return joint


def query_rows(n: int, query: Query) -> np.ndarray:
    """Row indices kept for `query`: cls -> [0], last -> [n-1], all -> 0..n-1."""
    if query not in QUERY_CHOICES:
        raise AttnpipeError(f"unknown query {query!r}: choose from {', '.join(QUERY_CHOICES)}")
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    return {"cls": np.array([0]), "last": np.array([n - 1]), "all": np.arange(n)}[query]


def start_position(layers: Sequence[int], start_layer: int | None) -> int:
    """Position in the stored layers of model layer `start_layer`; the stored layers from there on
    must be consecutive model layers (rollout multiplies every layer in between)."""
    layers = list(layers)
    start = 0 if start_layer is None else start_layer
    if start_layer is not None:
        if start_layer not in layers:
            raise AttnpipeError(f"--start-layer {start_layer} is not stored in the file: it holds layers {layers}")
        start = layers.index(start_layer)
    used = layers[start:]
    if used != list(range(used[0], used[0] + len(used))):
        raise AttnpipeError(
            f"rollout needs consecutive layers, but the file holds layers {layers}: "
            "extract with --layer all (or a consecutive range)"
        )
    return start


def text_rollout(item, layers: Sequence[int], *, head_fusion: HeadFusion = "mean",
                 discard_ratio: float = 0.0, start_layer: int | None = None,
                 query: Query = "cls") -> pd.DataFrame:
    """Long table for one store.TextAttention: text_id, query, key, query_token, key_token, value."""
    joint = rollout(item.attention, head_fusion, discard_ratio, start_position(layers, start_layer))
    rows = query_rows(joint.shape[0], query)
    return token_pair_table(item, rows, value=joint[rows])


def token_pair_table(item, rows: np.ndarray, **columns: np.ndarray) -> pd.DataFrame:
    """Long table of (query row, key) pairs of one text; each column is (len(rows), n) values."""
    q, k = np.meshgrid(rows, np.arange(item.num_tokens), indexing="ij")
    tokens = np.asarray(item.tokens, dtype=object)
    return pd.DataFrame({
        "text_id": item.id,
        "query": q.ravel(),
        "key": k.ravel(),
        "query_token": tokens[q.ravel()],
        "key_token": tokens[k.ravel()],
        **{name: values.ravel() for name, values in columns.items()},
    })


def corpus_rollout(attention_file, **options) -> pd.DataFrame:
    """text_rollout for every text of an open AttentionFile, one text in memory at a time."""
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    layers = attention_file.meta.layers
    return pd.concat([text_rollout(item, layers, **options) for item in attention_file], ignore_index=True)
