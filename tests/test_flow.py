"""Attention flow against answers that need no max-flow code (one and two layers) and against an
independent max-flow (scipy's C implementation on integer-scaled capacities) on small graphs."""

from __future__ import annotations

import numpy as np
import pytest
from networkx.algorithms.flow import preflow_push
from scipy.sparse import csr_array
from scipy.sparse.csgraph import maximum_flow

from attnpipe.analyze import flow as F
from attnpipe.analyze.rollout import layer_matrices

SCALE = 10**7  # integer capacities for scipy: weight 1 -> 10^7, well inside int32


def random_attention(seed: int, layers: int, heads: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(layers, heads, n, n)) * 2
    return np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)


def scipy_flows(mixed: np.ndarray, row: int) -> np.ndarray:
    """Max-flow from every input token to output `row`, by scipy on a dense node numbering."""
    num_layers, n, _ = mixed.shape
    size = (num_layers + 1) * n
    capacity = np.zeros((size, size), dtype=np.int32)
    for l in range(num_layers):
        # edge (l, j) -> (l + 1, i) holds mixed[l, i, j]
        capacity[l * n:(l + 1) * n, (l + 1) * n:(l + 2) * n] = np.rint(mixed[l].T * SCALE).astype(np.int32)
    graph = csr_array(capacity)
    sink = num_layers * n + row
    return np.array([maximum_flow(graph, j, sink).flow_value for j in range(n)]) / SCALE


def test_one_layer_flow_is_the_edge_weight():
    attention = random_attention(0, 1, 2, 4)
    mixed = layer_matrices(attention)[0]
    got = F.attention_flow(attention, query="all", normalise=False)
    np.testing.assert_allclose(got, mixed, atol=1e-12)  # a single path of one edge per pair


def test_two_layer_flow_is_a_sum_of_disjoint_paths():
    attention = random_attention(1, 2, 3, 4)
    first, second = layer_matrices(attention)  # (n, n) each
    # paths j -> (1, k) -> i share no edge, so the max flow is the sum of their bottlenecks
    expected = np.minimum(first.T[:, :, None], second.T[None, :, :]).sum(1).T  # [i, j] = sum_k min(first[k,j], second[i,k])
    got = F.attention_flow(attention, query="all", normalise=False)
    np.testing.assert_allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize("seed,layers,n", [(2, 3, 4), (3, 4, 5), (4, 3, 6)])
def test_flow_matches_scipy_max_flow(seed, layers, n):
    attention = random_attention(seed, layers, 2, n)
    mixed = layer_matrices(attention)
    got = F.attention_flow(attention, query="all", normalise=False)
    edges = layers * n * n
    for row in range(n):
        np.testing.assert_allclose(got[row], scipy_flows(mixed, row), atol=edges / SCALE)
    again = F.attention_flow(attention, query="all", normalise=False, flow_func=preflow_push)
    np.testing.assert_allclose(got, again, atol=1e-9)  # a second networkx algorithm agrees


def test_normalised_rows_and_query_choice():
    attention = random_attention(5, 3, 2, 5)
    every = F.attention_flow(attention, query="all")
    np.testing.assert_allclose(every.sum(1), 1.0)
    np.testing.assert_allclose(F.attention_flow(attention, query="cls"), every[[0]])
    np.testing.assert_allclose(F.attention_flow(attention, query="last"), every[[-1]])
    np.testing.assert_allclose(F.attention_flow(attention, start=1, query="all"),
                               F.attention_flow(attention[1:], query="all"))
