"""Property-based tests (hypothesis): generated attention files round-trip, and metrics stay in range.

Hypothesis draws the sizes (layers, heads, texts, tokens), causal or not, the storage dtype, how
peaked the rows are (uniform ... one-hot) and the token strings (any Unicode but NUL, which HDF5
strings cannot hold: see test_security.py). Every example is written with attnpipe.store's
writers, read back with its reader, and fed to the metrics (the numpy reference and the torch path
of attnpipe.analyze.metrics); each metric must stay in the range
docs/METRICS.md gives it. Runs are deterministic (derandomize=True) and small (max_examples).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attnpipe.analyze import metrics as M
from attnpipe.analyze import metric_reference as R  # the numpy oracle
from attnpipe.store import ROW_SUM_TOL, H5Writer, Provenance, TextAttention, open_attention, write_json

FAST = settings(max_examples=30, derandomize=True, deadline=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])

TOKEN = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=0, max_size=12)


def stochastic(rng: np.random.Generator, shape: tuple[int, ...], sharpness: float, causal: bool) -> np.ndarray:
    """Random rows summing to 1 over the visible keys: (L, H, n, n) float32 probabilities."""
    n = shape[-1]
    logits = rng.normal(size=shape) * sharpness
    if causal:
        logits = np.where(np.tril(np.ones((n, n), bool)), logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


@st.composite
def attention_files(draw):
    layers = draw(st.integers(1, 3))
    heads = draw(st.integers(1, 4))
    causal = draw(st.booleans())
    dtype = draw(st.sampled_from(["float32", "float16"]))
    sharpness = draw(st.sampled_from([0.0, 0.5, 2.0, 8.0, 60.0]))  # uniform ... one-hot rows
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    items = []
    for index in range(draw(st.integers(1, 3))):
        n = draw(st.integers(1, 12))
        tokens = tuple(draw(st.lists(TOKEN, min_size=n, max_size=n)))
        items.append(TextAttention(
            id=draw(TOKEN.filter(bool)) + f"#{index}",  # unique ids
            text=draw(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
                              max_size=40)),
            tokens=tokens, token_ids=rng.integers(0, 50_000, n), special_tokens_mask=rng.random(n) < 0.2,
            offsets=rng.integers(-1, 100, (n, 2)), word_ids=rng.integers(-1, n, n),
            truncated=bool(rng.random() < 0.3), num_tokens_untruncated=n + int(rng.integers(0, 3)),
            attention=stochastic(rng, (layers, heads, n, n), sharpness, causal),
        ))
    model_layers = tuple(sorted(rng.choice(12, layers, replace=False).tolist()))
    model_heads = tuple(sorted(rng.choice(16, heads, replace=False).tolist()))
    meta = Provenance(
        model="/models/generated", model_type="gpt2" if causal else "bert", weights_sha256="f" * 64,
        weight_files=("model.safetensors",), num_layers=12, num_heads=16, layers=model_layers,
        heads=model_heads, dtype=dtype, compute_dtype="float32", method="manual", max_length=64,
        trust_remote_code=False, library_versions={"attnpipe": "test"},
    )
    return items, meta, causal


def assert_same_text(got: TextAttention, want: TextAttention, dtype: str) -> None:
    assert (got.id, got.text, got.tokens) == (want.id, want.text, want.tokens)
    assert (got.truncated, got.num_tokens_untruncated) == (want.truncated, want.num_tokens_untruncated)
    for name in ("token_ids", "special_tokens_mask", "offsets", "word_ids"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    # Stored in `dtype`, read back as float32: exactly the rounded values.
    np.testing.assert_array_equal(got.attention, want.attention.astype(dtype).astype(np.float32))


def check_metric_ranges(values: dict[str, np.ndarray], n: int, causal: bool, dtype: str) -> None:
    """docs/METRICS.md's ranges, per head (mean over the rows where a metric is defined).

    A stored row sums to 1 only within the storage rounding (ROW_SUM_TOL: float16 rounds each
    weight to 11 bits), so a sum of weights may pass 1 by that much; the bounds allow it.
    """
    EPS = ROW_SUM_TOL[dtype]
    weights = ("max_attention", "self", "previous_token", "next_token", "first_token", "sep_eos",
               "punctuation", "local_share", "sparsity", "normalized_entropy")
    for name in weights:
        finite = values[name][np.isfinite(values[name])]
        assert np.all((finite >= -EPS) & (finite <= 1 + EPS)), (name, finite)
    assert np.all(values["entropy"] >= -EPS) and np.all(values["entropy"] <= math.log(n) + EPS), values["entropy"]
    assert np.all(values["mean_distance"] >= -EPS) and np.all(values["mean_distance"] <= n - 1 + EPS)
    assert np.all(values["max_attention"] >= 1 / n - EPS)  # some visible key has at least 1/|V(i)|
    # NaN only where the definition leaves a value out.
    for name, array in values.items():
        if name == "next_token":
                assert np.all(np.isnan(array)) == (causal or n == 1), (name, causal, n, array)
        elif name in ("normalized_entropy", "previous_token"):
            assert np.all(np.isnan(array)) == (n == 1), (name, n, array)
        else:
            assert np.all(np.isfinite(array)), (name, array)


@FAST
@given(attention_files())
def test_write_read_round_trip_and_metrics_in_range(generated):
    items, meta, causal = generated
    with tempfile.TemporaryDirectory() as folder:
        h5, js = Path(folder) / "a.h5", Path(folder) / "a.json"
        with H5Writer(h5, len(items), meta.dtype) as writer:
            for index in reversed(range(len(items))):  # any writing order
                writer.write(index, items[index])
            writer.finish(meta)
        write_json(js, items[0], meta)
        with open_attention(h5) as f:
            assert f.meta == meta and f.ids == tuple(item.id for item in items)
            for want, got in zip(items, f, strict=True):
                assert_same_text(got, want, meta.dtype)
            table = R.corpus_metrics(f)  # the file's causal-ness is inferred from the stored zeros
        with open_attention(js) as f:
            assert f.meta == meta
            assert_same_text(f[0], items[0], meta.dtype)
    assert len(table) == len(items) * len(meta.layers) * len(meta.heads) * len(M.METRICS)
    assert set(table["layer"]) == set(meta.layers) and set(table["head"]) == set(meta.heads)
    for item in items:
        stored = item.attention.astype(meta.dtype).astype(np.float32)
        read_as_causal = M.infer_causal(stored)  # what corpus_metrics did: a causal file has zeros above
        assert read_as_causal == (causal and item.num_tokens > 1) or not np.any(np.triu(stored, 1)), (
            read_as_causal, causal, item.num_tokens)
        values = R.head_metrics(stored, item.tokens, item.special_tokens_mask, causal=read_as_causal)
        check_metric_ranges(values, item.num_tokens, read_as_causal, meta.dtype)
        # what every caller gets (the torch path, float32 rows) stays in the same ranges
        fast = M.head_metrics(stored, item.tokens, item.special_tokens_mask, causal=read_as_causal)
        check_metric_ranges(fast, item.num_tokens, read_as_causal, meta.dtype)
        from_file = table[table["text_id"] == item.id]
        for name, array in values.items():
            got = from_file[from_file["metric"] == name]["value"].to_numpy()
            np.testing.assert_allclose(got, array.ravel(), rtol=0, atol=1e-12, equal_nan=True)


@FAST
@given(attention_files())
def test_inferred_causality_matches_the_generator(generated):
    items, _, causal = generated
    for item in items:
        upper_zero = bool(np.all(np.triu(item.attention, 1) == 0))
        assert causal <= upper_zero  # a causal generator leaves exact zeros above the diagonal
        # One token: nothing to tell, read as bidirectional by convention (docs/METRICS.md).
        assert M.infer_causal(item.attention) == (item.num_tokens > 1 and upper_zero)
