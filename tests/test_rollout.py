"""Rollout against a hand-computed 3-token, 2-layer case and against an independent brute force
(sum over every path through the layers) on small random inputs."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from attnpipe.analyze import rollout as R
from attnpipe.errors import AttnpipeError

SWAP_01 = [[0, 1, 0], [1, 0, 0], [0, 0, 1]]  # tokens 0 and 1 look at each other, 2 at itself
TO_LAST = [[0, 0, 1], [0, 1, 0], [0, 1, 0]]


def test_hand_computed_three_tokens_two_layers():
    attention = np.array([[SWAP_01], [TO_LAST]], dtype=np.float64)  # (2 layers, 1 head, 3, 3)
    # 0.5 A + 0.5 I: layer 0 -> [[.5,.5,0],[.5,.5,0],[0,0,1]]; layer 1 -> [[.5,0,.5],[0,1,0],[0,.5,.5]]
    # R = layer1 @ layer0, worked by hand:
    expected = [[0.25, 0.25, 0.5], [0.5, 0.5, 0.0], [0.25, 0.25, 0.5]]
    np.testing.assert_allclose(R.rollout(attention), expected, atol=1e-12)
    # from layer 1 only: just layer 1's mixed matrix
    np.testing.assert_allclose(R.rollout(attention, start=1), [[0.5, 0, 0.5], [0, 1, 0], [0, 0.5, 0.5]])


def test_head_fusion_max_renormalises_rows():
    attention = np.array([[SWAP_01, np.eye(3)]], dtype=np.float64)  # (1, 2, 3, 3)
    # max over heads [[1,1,0],[1,1,0],[0,0,1]]; 0.5 max + 0.5 I = [[1,.5,0],[.5,1,0],[0,0,1]]; rows / sum
    expected = [[2 / 3, 1 / 3, 0], [1 / 3, 2 / 3, 0], [0, 0, 1]]
    np.testing.assert_allclose(R.rollout(attention, head_fusion="max"), expected)
    np.testing.assert_allclose(R.rollout(attention, head_fusion="min"), np.eye(3))  # min is 0 off-diagonal
    np.testing.assert_allclose(R.rollout(attention, head_fusion="mean"),
                               [[0.75, 0.25, 0], [0.25, 0.75, 0], [0, 0, 1]])


def brute_force(attention, head_fusion, discard_ratio, start):
    """R[i, j] = sum over every path j = k_0 -> k_1 -> ... -> k_L = i of the product of mixed weights."""
    fuse = {"mean": np.mean, "max": np.max, "min": np.min}[head_fusion]
    layers = []
    for layer in attention[start:]:
        fused = fuse(layer, axis=0)
        if discard_ratio:
            cut = np.sort(fused, axis=None)[int(np.floor(discard_ratio * fused.size)) - 1]
            fused = np.where(fused <= cut, 0.0, fused)  # random values: no ties
        mixed = 0.5 * fused + 0.5 * np.eye(len(fused))
        layers.append(mixed / mixed.sum(1, keepdims=True))
    n = attention.shape[-1]
    out = np.zeros((n, n))
    for i, j in itertools.product(range(n), repeat=2):
        for middle in itertools.product(range(n), repeat=len(layers) - 1):
            path = (j, *middle, i)
            out[i, j] += np.prod([layers[l][path[l + 1], path[l]] for l in range(len(layers))])
    return out


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("head_fusion", R.HEAD_FUSIONS)
def test_rollout_equals_sum_over_paths(seed, head_fusion):
    rng = np.random.default_rng(seed)
    num_layers, heads, n = 3 + seed % 2, 2, 3 + seed % 2
    attention = rng.random((num_layers, heads, n, n))
    attention /= attention.sum(-1, keepdims=True)
    discard = 0.25 if seed % 2 else 0.0
    start = seed % 2
    got = R.rollout(attention, head_fusion, discard, start)
    np.testing.assert_allclose(got, brute_force(attention, head_fusion, discard, start), atol=1e-12)
    np.testing.assert_allclose(got.sum(1), 1.0)  # rows stay distributions


def test_discard_smallest():
    m = np.array([[0.1, 0.9], [0.6, 0.4]])
    np.testing.assert_array_equal(R.discard_smallest(m, 0.5), [[0, 0.9], [0.6, 0]])
    np.testing.assert_array_equal(R.discard_smallest(m, 0.0), m)
    with pytest.raises(AttnpipeError, match=r"\[0, 1\)"):
        R.discard_smallest(m, 1.0)


def test_query_rows_start_layer_and_errors():
    np.testing.assert_array_equal(R.query_rows(4, "cls"), [0])
    np.testing.assert_array_equal(R.query_rows(4, "last"), [3])
    np.testing.assert_array_equal(R.query_rows(4, "all"), [0, 1, 2, 3])
    assert R.start_position([2, 3, 4], 3) == 1 and R.start_position([2, 3, 4], None) == 0
    assert R.start_position([0, 5], 5) == 1  # one layer from there: consecutive
    with pytest.raises(AttnpipeError, match="consecutive"):
        R.start_position([0, 5], None)
    with pytest.raises(AttnpipeError, match="not stored"):
        R.start_position([0, 1], 4)
    with pytest.raises(AttnpipeError, match="head fusion"):
        R.rollout(np.ones((1, 1, 2, 2)) / 2, head_fusion="median")
