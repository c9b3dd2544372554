"""Head clustering (Clark et al. 2019, §6): how alike two heads' attention is, over a corpus.

Distance between heads a and b: the Jensen-Shannon distance (the square root of the JS
divergence, base 2, so it lies in [0, 1] and is a metric) between their attention rows for the
same query, averaged over the query rows of a text and then over texts. Clark et al. sum JS
divergences over tokens; the mean of a distance keeps values comparable across corpora.
From the (K, K) distance matrix of K = layers x heads: a 2-D classical (Torgerson) MDS embedding
and an average-linkage hierarchical clustering (scipy). The number of clusters, unless given, is
the cut of that tree with the highest mean silhouette (Rousseeuw 1987) among 2..12 clusters whose
largest cluster holds at most half of the heads: the grouping in which heads sit closest to their
own cluster relative to the nearest other one, without the cuts that only split off outliers
(`choose_num_clusters`).

Example::

    with open_attention("results/demo/attention.h5") as f:
        distances, heads = corpus_head_distances(f)           # (K, K), [(layer, head), ...]
    table = cluster_table(distances, heads)                    # layer, head, x, y, cluster (k by silhouette)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform
from scipy.special import entr

from attnpipe.errors import AttnpipeError

LINKAGE_METHOD = "average"  # UPGMA: uses the distances as they are (no Euclidean assumption, unlike Ward)
AUTO_MAX_CLUSTERS = 12  # the automatic choice tries 2..12 clusters: more groups than a reader can name
MAX_SHARE = 0.5  # ... and keeps cuts whose largest cluster holds at most this share of the heads


def _entropy_bits(p: np.ndarray) -> np.ndarray:
    """Shannon entropy in bits over the last axis, with 0·log 0 = 0."""
    return entr(p).sum(-1) / np.log(2)


def js_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Jensen-Shannon distance (base 2, in [0, 1]) between distributions on the last axis.

    Uses JSD(p, q) = H((p + q) / 2) - (H(p) + H(q)) / 2, one logarithm per weight.
    """
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    divergence = _entropy_bits(0.5 * (p + q)) - 0.5 * (_entropy_bits(p) + _entropy_bits(q))
    return np.sqrt(np.clip(divergence, 0.0, None))  # clip: rounding can give -1e-17


def head_distances(attention: np.ndarray) -> np.ndarray:
    """(L, H, n, n) -> (L·H, L·H): mean over query rows of the JS distance between two heads' rows.

    Heads are flattened layer-major: index = layer_position · H + head_position.
    """
    attention = np.asarray(attention, dtype=np.float64)
    num_layers, num_heads, n, _ = attention.shape
    heads = attention.reshape(num_layers * num_heads, n, n)  # (K, n, n)
    own = _entropy_bits(heads)  # (K, n): H of every row of every head, computed once
    out = np.zeros((len(heads), len(heads)))
    for a in range(len(heads)):
        mixed = _entropy_bits(0.5 * (heads[a][None] + heads))  # (K, n)
        divergence = mixed - 0.5 * (own[a][None] + own)
        out[a] = np.sqrt(np.clip(divergence, 0.0, None)).mean(-1)  # (K,): mean over the n query rows
    return 0.5 * (out + out.T)  # exact symmetry (the two directions round differently)


def corpus_head_distances(attention_file) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Mean over texts of head_distances, reading one text at a time; heads as (layer, head) model indices."""
    if len(attention_file) == 0:
        raise AttnpipeError(f"{attention_file.path} holds no texts")
    meta = attention_file.meta
    total = None
    for item in attention_file:
        distances = head_distances(item.attention)
        total = distances if total is None else total + distances
    labels = [(layer, head) for layer in meta.layers for head in meta.heads]
    return total / len(attention_file), labels


def classical_mds(distances: np.ndarray, dimensions: int = 2) -> np.ndarray:
    """(K, K) distances -> (K, dimensions) Torgerson MDS coordinates (deterministic up to sign;
    the sign of each axis is fixed so that its largest-magnitude coordinate is positive)."""
    k = len(distances)
    centring = np.eye(k) - np.full((k, k), 1.0 / k)
    gram = -0.5 * centring @ (distances ** 2) @ centring  # (K, K)
    values, vectors = np.linalg.eigh(gram)
    order = np.argsort(values)[::-1][:dimensions]
    coords = vectors[:, order] * np.sqrt(np.clip(values[order], 0.0, None))
    flip = np.sign(coords[np.abs(coords).argmax(0), np.arange(coords.shape[1])])
    flip[flip == 0] = 1.0
    coords = coords * flip
    if coords.shape[1] < dimensions:  # fewer heads than dimensions
        coords = np.pad(coords, ((0, 0), (0, dimensions - coords.shape[1])))
    return coords


def cluster_heads(distances: np.ndarray, num_clusters: int) -> np.ndarray:
    """(K, K) distances -> (K,) cluster labels 1..num_clusters from average-linkage clustering."""
    k = len(distances)
    if not 1 <= num_clusters <= k:
        raise AttnpipeError(f"--clusters {num_clusters} is out of range: there are {k} heads")
    if k == 1:
        return np.ones(1, dtype=np.int64)
    tree = linkage(squareform(distances, checks=False), method=LINKAGE_METHOD)
    return fcluster(tree, t=num_clusters, criterion="maxclust").astype(np.int64)


def silhouette(distances: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette of a partition on a precomputed distance matrix (a singleton counts 0)."""
    scores = np.zeros(len(labels))
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return 0.0
    for i, own in enumerate(labels):
        mates = (labels == own) & (np.arange(len(labels)) != i)
        if not mates.any():
            continue
        a = distances[i, mates].mean()  # mean distance to the own cluster
        b = min(distances[i, labels == other].mean() for other in clusters if other != own)
        scores[i] = (b - a) / max(a, b) if max(a, b) > 0 else 0.0
    return float(scores.mean())


def choose_num_clusters(distances: np.ndarray, max_clusters: int = AUTO_MAX_CLUSTERS) -> int:
    """The number of clusters (2..max) whose average-linkage cut has the highest mean silhouette,
    among the cuts whose largest cluster holds at most half of the heads (MAX_SHARE).

    Attention heads have outliers (a head on the diagonal, a head on [SEP]) far from the rest:
    cutting them off alone scores a high silhouette yet leaves almost every head in one group.
    Only when no cut in range meets the share does the best silhouette overall decide."""
    k = len(distances)
    if k < 3:
        return 1
    tree = linkage(squareform(distances, checks=False), method=LINKAGE_METHOD)
    scored = []  # (readable, silhouette, -count): max() prefers readable, then score, then fewer
    for count in range(2, min(max_clusters, k - 1) + 1):
        labels = fcluster(tree, t=count, criterion="maxclust")
        readable = np.bincount(labels).max() <= MAX_SHARE * k
        scored.append((readable, round(silhouette(distances, labels), 12), -count))
    return -max(scored)[2]


def cluster_table(distances: np.ndarray, heads: Sequence[tuple[int, int]],
                  num_clusters: int | None = None) -> pd.DataFrame:
    """One row per head: layer, head (model indices), x, y (MDS), cluster.

    `num_clusters` None: chosen by `choose_num_clusters` (stored in the table's attrs)."""
    if num_clusters is None:
        num_clusters = choose_num_clusters(distances)
    coords = classical_mds(distances)
    table = pd.DataFrame({
        "layer": [layer for layer, _ in heads],
        "head": [head for _, head in heads],
        "x": coords[:, 0],
        "y": coords[:, 1],
        "cluster": cluster_heads(distances, num_clusters),
    })
    table.attrs["num_clusters"] = num_clusters
    return table


def distance_table(distances: np.ndarray, heads: Sequence[tuple[int, int]]) -> pd.DataFrame:
    """Long table of the distance matrix: layer_a, head_a, layer_b, head_b, js_distance."""
    a, b = np.meshgrid(np.arange(len(heads)), np.arange(len(heads)), indexing="ij")
    heads_arr = np.asarray(heads, dtype=np.int64).reshape(-1, 2)
    return pd.DataFrame({
        "layer_a": heads_arr[a.ravel(), 0], "head_a": heads_arr[a.ravel(), 1],
        "layer_b": heads_arr[b.ravel(), 0], "head_b": heads_arr[b.ravel(), 1],
        "js_distance": distances.ravel(),
    })
