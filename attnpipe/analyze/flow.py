"""Attention flow (Abnar & Zuidema 2020): maximum flow through the layered attention graph.

The graph has a node (l, i) for every layer boundary l = 0..L (0 = the input tokens, L = the
output of the last layer used) and token i. Layer l's residual-mixed, head-fused matrix Â_l (the
same matrices as rollout: attnpipe.analyze.rollout.layer_matrices) gives an edge (l, j) -> (l + 1, i) of
capacity Â_l[i, j] for every non-zero weight. The flow from input token j to output position i
is the value of a maximum flow from (0, j) to (L, i). As in the authors' code, each output row is
then normalised to sum to 1 over the input tokens (`normalise=True`).

Cost: one max-flow per (output row, input token), by networkx's shortest augmenting path
algorithm (the authors used Edmonds-Karp, which gives the same values but ran ~40x slower here). The residual network is built once per text
and reused (networkx resets its flows), so a row of n tokens costs n max-flow runs; `query="cls"`
or `"last"` computes one row, `"all"` n rows. Measured for 128 tokens x 12 layers: see
docs/METRICS.md ("Attention flow").

Example::

    from attnpipe.analyze.flow import attention_flow
    flows = attention_flow(item.attention, query="cls")   # (1, n): what [CLS] draws from each token
"""

from __future__ import annotations

from collections.abc import Callable

import networkx as nx
import numpy as np
import pandas as pd
from networkx.algorithms.flow import build_residual_network, shortest_augmenting_path

from attnpipe.errors import AttnpipeError
from attnpipe.analyze.rollout import HeadFusion, Query, layer_matrices, query_rows, start_position, token_pair_table


def flow_graph(mixed: np.ndarray) -> nx.DiGraph:
    """(L, n, n) layer matrices -> DiGraph with nodes (l, i), l = 0..L, and capacity edges
    (l, j) -> (l + 1, i) of weight mixed[l, i, j] (rows = queries at the upper boundary)."""
    num_layers, n, _ = mixed.shape
    graph = nx.DiGraph()
    graph.add_nodes_from((l, i) for l in range(num_layers + 1) for i in range(n))
    for l in range(num_layers):
        queries, keys = np.nonzero(mixed[l])
        graph.add_edges_from(
            ((l, int(j)), (l + 1, int(i)), {"capacity": float(mixed[l, i, j])})
            for i, j in zip(queries, keys, strict=True)
        )
    return graph


def max_flows_to(graph: nx.DiGraph, sink: tuple[int, int], sources: list[tuple[int, int]],
                 flow_func: Callable = shortest_augmenting_path, residual: nx.DiGraph | None = None) -> np.ndarray:
    """Maximum flow value from each source to `sink`, reusing one residual network."""
    residual = build_residual_network(graph, "capacity") if residual is None else residual
    return np.array([nx.maximum_flow_value(graph, source, sink, flow_func=flow_func, residual=residual)
                     for source in sources])


def attention_flow(attention: np.ndarray, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0,
                   start: int = 0, query: Query = "cls", normalise: bool = True,
                   flow_func: Callable = shortest_augmenting_path) -> np.ndarray:
    """(L, H, n, n) -> (rows, n): flow from each input token (columns) to each chosen output row
    (query: cls -> row 0, last -> row n-1, all -> every row), from stored layer position `start`."""
    attention = np.asarray(attention)
    if attention.ndim != 4:
        raise AttnpipeError(f"attention has shape {attention.shape}; expected (layer, head, n, n)")
    if not 0 <= start < attention.shape[0]:
        raise AttnpipeError(f"start layer position {start} is out of range: {attention.shape[0]} layer(s) stored")
    mixed = layer_matrices(attention[start:], head_fusion, discard_ratio)  # (L', n, n)
    num_layers, n = mixed.shape[0], mixed.shape[-1]
    graph = flow_graph(mixed)
    residual = build_residual_network(graph, "capacity")
    sources = [(0, j) for j in range(n)]
    rows = query_rows(n, query)
    flows = np.stack([max_flows_to(graph, (num_layers, int(i)), sources, flow_func, residual) for i in rows])
    if normalise:
        flows = flows / flows.sum(-1, keepdims=True)
    return flows  # (rows, n)


def text_flow(item, layers, *, head_fusion: HeadFusion = "mean", discard_ratio: float = 0.0,
              start_layer: int | None = None, query: Query = "cls") -> pd.DataFrame:
    """Long table for one store.TextAttention: text_id, query, key, query_token, key_token, value
    (normalised flow) and raw_flow (max-flow value)."""
    start = start_position(layers, start_layer)
    raw = attention_flow(item.attention, head_fusion, discard_ratio, start, query, normalise=False)
    rows = query_rows(item.num_tokens, query)
    return token_pair_table(item, rows, value=raw / raw.sum(-1, keepdims=True), raw_flow=raw)


def corpus_flow(attention_file, **options) -> pd.DataFrame:
    """text_flow for every text of an open AttentionFile, one text in memory at a time."""
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    layers = attention_file.meta.layers
    return pd.concat([text_flow(item, layers, **options) for item in attention_file], ignore_index=True)
