"""Head clustering: JS distance on known distributions, MDS on known geometry, and recovery of
planted groups of heads in synthetic attention."""

from __future__ import annotations

import numpy as np
import pytest

from attnpipe.analyze import clustering as C
from attnpipe.errors import AttnpipeError


def test_js_distance_known_values():
    assert C.js_distance([1, 0], [1, 0]) == 0
    assert C.js_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint supports: 1 bit
    # p = (1, 0), q = (.5, .5): m = (.75, .25); JSD = .5·log2(1/.75) + .5·(.5·log2(.5/.75) + .5·log2(.5/.25))
    jsd = 0.5 * np.log2(4 / 3) + 0.5 * (0.5 * np.log2(2 / 3) + 0.5 * np.log2(2))
    assert C.js_distance([1, 0], [0.5, 0.5]) == pytest.approx(np.sqrt(jsd))


def test_classical_mds_recovers_points_on_a_line():
    points = np.array([0.0, 1.0, 3.0, 7.0])
    distances = np.abs(points[:, None] - points[None, :])
    coords = C.classical_mds(distances)
    np.testing.assert_allclose(np.abs(coords[:, 0] - coords[0, 0]), points, atol=1e-9)
    np.testing.assert_allclose(coords[:, 1], 0, atol=1e-6)


def planted_attention(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(3 layers, 4 heads, n, n) heads of three kinds: previous-token, first-token, broad; + noise."""
    kinds = np.array([[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]])  # planted group of each head
    prev = np.eye(n, k=-1)
    prev[0, 0] = 1
    first = np.zeros((n, n))
    first[:, 0] = 1
    broad = np.full((n, n), 1 / n)
    patterns = [prev, first, broad]
    attention = np.empty((3, 4, n, n))
    for layer, head in np.ndindex(kinds.shape):
        noisy = patterns[kinds[layer, head]] + 0.15 * rng.random((n, n))
        attention[layer, head] = noisy / noisy.sum(-1, keepdims=True)
    return attention, kinds.ravel()


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return all((a[i] == a[j]) == (b[i] == b[j]) for i in range(len(a)) for j in range(len(a)))


def test_clustering_recovers_planted_groups():
    rng = np.random.default_rng(0)
    texts = [planted_attention(rng, n) for n in (6, 9, 12)]
    distances = np.mean([C.head_distances(att) for att, _ in texts], axis=0)
    planted = texts[0][1]
    assert np.allclose(distances, distances.T) and np.allclose(np.diag(distances), 0, atol=1e-6)
    within = distances[planted[:, None] == planted[None, :]].max()
    between = distances[planted[:, None] != planted[None, :]].min()
    assert within < between
    heads = [(layer, head) for layer in (0, 1, 2) for head in (0, 1, 2, 3)]
    table = C.cluster_table(distances, heads, num_clusters=3)
    assert same_partition(table.cluster.to_numpy(), planted)
    # the MDS embedding separates the groups too: each point is nearest its own group's centroid
    coords = table[["x", "y"]].to_numpy()
    centroids = np.stack([coords[planted == g].mean(0) for g in range(3)])
    nearest = np.linalg.norm(coords[:, None] - centroids[None], axis=-1).argmin(1)
    np.testing.assert_array_equal(nearest, planted)


def test_the_default_count_is_the_cut_with_the_best_silhouette():
    rng = np.random.default_rng(0)
    texts = [planted_attention(rng, n) for n in (6, 9, 12)]
    distances = np.mean([C.head_distances(att) for att, _ in texts], axis=0)
    heads = [(layer, head) for layer in (0, 1, 2) for head in (0, 1, 2, 3)]
    table = C.cluster_table(distances, heads)  # no count given: chosen
    assert table.attrs["num_clusters"] == 3 and same_partition(table.cluster.to_numpy(), texts[0][1])
    # Hand-checked silhouettes: two tight pairs far apart score near 1; one cluster scores 0.
    pairs = np.array([[0, .1, 1, 1], [.1, 0, 1, 1], [1, 1, 0, .1], [1, 1, .1, 0]])
    assert C.silhouette(pairs, np.array([1, 1, 2, 2])) == pytest.approx(0.9)
    assert C.silhouette(pairs, np.array([1, 1, 1, 1])) == 0.0
    assert C.choose_num_clusters(pairs) == 2


def test_cluster_count_is_checked():
    with pytest.raises(AttnpipeError, match="out of range"):
        C.cluster_heads(np.zeros((3, 3)), 4)
