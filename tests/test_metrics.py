"""Metrics on hand-built matrices with answers worked out by hand (seed 004's four patterns,
uniform attention), for bidirectional and causal rows, checked on both implementations: the numpy
reference (attnpipe.analyze.metric_reference, the oracle) and the torch path every caller uses
(attnpipe.analyze.metrics); then the fast path against the reference on a whole file, the long
table and the aggregates."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest

from attnpipe import store
from attnpipe.analyze import metric_reference as R
from attnpipe.analyze import metrics as M
from attnpipe.errors import AttnpipeError
from test_analyze_cli import PROVENANCE, item

TOKENS4 = ("[CLS]", "cat", ",", "[SEP]")
SPECIAL4 = np.array([True, False, False, True])


def one_head(matrix) -> np.ndarray:
    """(n, n) rows (normalised here) -> (1, 1, n, n)."""
    m = np.asarray(matrix, dtype=np.float64)
    m = m / m.sum(-1, keepdims=True)
    return m[None, None]


# The fast path computes each row in float32 (attnpipe.analyze.fast_metrics): 1e-6 relative, not
# numpy's default 1e-7, where a test compares whole arrays.
RTOL = {"reference": 1e-7, "fast": 1e-6}


@pytest.fixture(params=["reference", "fast"])
def impl(request) -> str:
    return request.param


def head_metrics(impl: str, *args, **kw) -> dict[str, np.ndarray]:
    return (R.head_metrics if impl == "reference" else M.head_metrics)(*args, **kw)


def values(impl, matrix, tokens=TOKENS4, special=SPECIAL4, **kw) -> dict[str, float]:
    return {k: float(v[0, 0]) for k, v in head_metrics(impl, one_head(matrix), tokens, special, **kw).items()}


def xlogx(x: float) -> float:
    return 0.0 if x == 0 else x * math.log(x)


# seed 004's patterns, rows normalised
DIAGONAL = [[1.0, 0.1, 0, 0], [0.1, 1.0, 0.1, 0], [0, 0.1, 1.0, 0.1], [0, 0, 0.1, 1.0]]
STRIPE = [[0.1, 0.8, 0.05, 0.05]] * 4
BLOCK = [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
BOS = [[1.0, 0, 0, 0], [0.8, 0.2, 0, 0], [0.6, 0.2, 0.2, 0], [0.5, 0.2, 0.2, 0.1]]


def test_identity_is_pure_self_attention(impl):
    assert M.infer_causal(one_head(np.eye(4)))  # nothing above the diagonal: ambiguous, so say it
    v = values(impl, np.eye(4), causal=False)
    assert v["self"] == 1 and v["max_attention"] == 1 and v["entropy"] == 0
    assert v["normalized_entropy"] == 0 and v["mean_distance"] == 0 and v["local_share"] == 1
    assert v["previous_token"] == 0 and v["next_token"] == 0
    assert v["sparsity"] == pytest.approx(3 / 4)  # three of four keys get 0 < threshold
    assert v["first_token"] == pytest.approx(1 / 4)  # only query 0 looks at key 0


def test_seed_004_diagonal_pattern(impl):
    v = values(impl, DIAGONAL)
    # rows 0 and 3 are (1, .1)/1.1, rows 1 and 2 are (.1, 1, .1)/1.2
    assert v["self"] == pytest.approx((2 / 1.1 + 2 / 1.2) / 4)
    assert v["max_attention"] == pytest.approx(v["self"])
    assert v["previous_token"] == pytest.approx((0.1 / 1.2 + 0.1 / 1.2 + 0.1 / 1.1) / 3)
    assert v["next_token"] == pytest.approx((0.1 / 1.1 + 0.1 / 1.2 + 0.1 / 1.2) / 3)
    assert v["local_share"] == pytest.approx(1.0)
    assert v["mean_distance"] == pytest.approx((2 * 0.1 / 1.1 + 2 * 0.2 / 1.2) / 4)
    h_end = -(xlogx(1 / 1.1) + xlogx(0.1 / 1.1))
    h_mid = -(xlogx(1 / 1.2) + 2 * xlogx(0.1 / 1.2))
    assert v["entropy"] == pytest.approx((2 * h_end + 2 * h_mid) / 4)
    assert v["normalized_entropy"] == pytest.approx(v["entropy"] / math.log(4))
    assert v["sparsity"] == pytest.approx((2 / 4 + 1 / 4 + 1 / 4 + 2 / 4) / 4)


def test_seed_004_vertical_stripe(impl):
    v = values(impl, STRIPE)
    assert v["max_attention"] == pytest.approx(0.8)
    assert v["first_token"] == pytest.approx(0.1)
    assert v["self"] == pytest.approx((0.1 + 0.8 + 0.05 + 0.05) / 4)
    assert v["previous_token"] == pytest.approx((0.1 + 0.8 + 0.05) / 3)  # a10, a21, a32
    assert v["next_token"] == pytest.approx((0.8 + 0.05 + 0.05) / 3)  # a01, a12, a23
    assert v["sep_eos"] == pytest.approx(0.05)  # key 3 is [SEP]
    assert v["punctuation"] == pytest.approx(0.05)  # key 2 is ","
    assert v["entropy"] == pytest.approx(-(xlogx(0.1) + xlogx(0.8) + 2 * xlogx(0.05)))
    assert v["sparsity"] == 0
    # distances: row0 .8*1+.05*2+.05*3, row1 .1+.05+.05*2, row2 .1*2+.8+.05, row3 .1*3+.8*2+.05
    assert v["mean_distance"] == pytest.approx((1.05 + 0.25 + 1.05 + 1.95) / 4)


def test_seed_004_block_pattern(impl):
    v = values(impl, BLOCK)
    assert v["entropy"] == pytest.approx(math.log(2))
    assert v["normalized_entropy"] == pytest.approx(0.5)  # ln 2 / ln 4
    assert v["self"] == pytest.approx(0.5) and v["max_attention"] == pytest.approx(0.5)
    assert v["previous_token"] == pytest.approx(1 / 3)  # a10 = .5, a21 = 0, a32 = .5
    assert v["next_token"] == pytest.approx(1 / 3)
    assert v["mean_distance"] == pytest.approx(0.5)
    assert v["sparsity"] == pytest.approx(0.5)


def test_seed_004_first_token_pattern_is_recognised_as_causal(impl):
    assert M.infer_causal(one_head(BOS))
    v = values(impl, BOS)
    assert v["first_token"] == pytest.approx((1 + 0.8 + 0.6 + 0.5) / 4)
    assert v["self"] == pytest.approx((1 + 0.2 + 0.2 + 0.1) / 4)
    assert v["previous_token"] == pytest.approx((0.8 + 0.2 + 0.2) / 3)
    assert math.isnan(v["next_token"])  # no causal row may see its next token
    rows = [[1.0], [0.8, 0.2], [0.6, 0.2, 0.2], [0.5, 0.2, 0.2, 0.1]]
    h = [-sum(xlogx(x) for x in r) for r in rows]
    assert v["entropy"] == pytest.approx(sum(h) / 4)
    # row 0 sees one key: skipped; row i is normalised by ln(i + 1)
    assert v["normalized_entropy"] == pytest.approx((h[1] / math.log(2) + h[2] / math.log(3) + h[3] / math.log(4)) / 3)
    # sparsity counts visible keys only: none is below 0.01
    assert v["sparsity"] == 0
    forced = values(impl, BOS, causal=False)  # the same matrix read as bidirectional
    assert forced["normalized_entropy"] == pytest.approx(sum(h) / 4 / math.log(4))
    assert forced["sparsity"] == pytest.approx((3 + 2 + 1 + 0) / 4 / 4)
    assert forced["next_token"] == pytest.approx(0.0)


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_uniform_attention_has_normalised_entropy_one(n, impl):
    tokens = tuple(f"t{i}" for i in range(n))
    bi = head_metrics(impl, np.full((2, 3, n, n), 1 / n), tokens)
    if n == 1:
        assert np.isnan(bi["normalized_entropy"]).all()  # one key: undefined, documented
        assert np.allclose(bi["entropy"], 0)
        return
    rtol = RTOL[impl]
    np.testing.assert_allclose(bi["normalized_entropy"], 1.0, rtol=rtol)
    np.testing.assert_allclose(bi["entropy"], math.log(n), rtol=rtol)
    np.testing.assert_allclose(bi["max_attention"], 1 / n, rtol=rtol)
    causal = np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]
    ca = head_metrics(impl, np.broadcast_to(causal, (2, 3, n, n)), tokens)
    np.testing.assert_allclose(ca["normalized_entropy"], 1.0, rtol=rtol)
    np.testing.assert_allclose(ca["entropy"], np.mean(np.log(np.arange(1, n + 1))), rtol=rtol)


def test_token_classes():
    assert M.is_punctuation(",") and M.is_punctuation("##.") and M.is_punctuation("Ġ!\"")
    assert not M.is_punctuation("[SEP]") and not M.is_punctuation("a.") and not M.is_punctuation("Ġ")
    tokens = ("<s>", "Hi", "</s>", "x", "[SEP]")
    np.testing.assert_array_equal(M.sep_eos_keys(tokens, None), [False, False, True, False, True])
    np.testing.assert_array_equal(M.sep_eos_keys(("a", "b", "c"), np.array([True, False, True])), [False, False, True])


def test_unknown_metric_and_bad_shapes(impl):
    with pytest.raises(AttnpipeError, match="unknown metric.*nope.*entropy"):
        head_metrics(impl, one_head(BLOCK), TOKENS4, metrics=["entropy", "nope"])
    with pytest.raises(AttnpipeError, match="3 tokens"):
        head_metrics(impl, one_head(BLOCK), TOKENS4[:3])


def causal_item(rng, text_id: str, n: int) -> store.TextAttention:
    """A text whose every head is causal: weights above the diagonal exactly 0."""
    base = item(rng, text_id, n)
    probs = np.tril(base.attention.astype(np.float64) + 0.01)
    return dataclasses.replace(base, attention=(probs / probs.sum(-1, keepdims=True)).astype(np.float32))


@pytest.mark.parametrize("workers", [1, 2])
def test_every_caller_gets_the_fast_path_and_it_equals_the_reference(tmp_path, workers, monkeypatch):
    """metrics.corpus_metrics (what every subcommand and compare/report call) is the torch path,
    and on a file of mixed lengths (padded batches), causal and bidirectional texts and a one-token
    text it gives the reference's table to float32 precision."""
    from attnpipe.analyze import fast_metrics

    monkeypatch.setattr(fast_metrics, "MIN_TEXTS_PER_WORKER", 1)  # two workers even on a small file
    calls, texts_values = [], fast_metrics.texts_values
    monkeypatch.setattr(fast_metrics, "texts_values", lambda *a, **k: calls.append(1) or texts_values(*a, **k))
    rng = np.random.default_rng(3)
    lengths = (5, 8, 1, 6, 7, 4, 8, 3)
    items = [(causal_item if i % 2 else item)(rng, f"t{i}", n) for i, n in enumerate(lengths)]
    path = tmp_path / "mixed.h5"
    with store.H5Writer(path, num_texts=len(items), dtype="float32") as writer:
        for index, it in enumerate(items):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    with store.open_attention(path) as f:
        want = R.corpus_metrics(f)
        got = M.corpus_metrics(f, workers=workers)
    assert workers > 1 or calls  # computed by fast_metrics (with workers, in the child processes)
    keys = ["text_id", "layer", "head", "metric"]
    assert list(got.columns) == list(want.columns) and got[keys].astype(str).equals(want[keys].astype(str))
    np.testing.assert_allclose(got["value"], want["value"], rtol=2e-5, atol=2e-6)  # float32 rows
    assert (got["value"].isna() == want["value"].isna()).all()
    nan_rows = got[(got.text_id == "t2") & (got.metric == "normalized_entropy")]  # one token: undefined
    assert nan_rows["value"].isna().all()


def test_long_table_uses_model_indices_and_any_size(impl):
    rng = np.random.default_rng(0)
    att = rng.random((3, 5, 6, 6))
    att /= att.sum(-1, keepdims=True)
    values_ = head_metrics(impl, att, tuple("abcdef"), metrics=["entropy", "self"])
    table = M.long_table("t1", values_, layers=[0, 4, 7], heads=[1, 2, 3, 8, 9])
    assert list(table.columns) == list(M.LONG_COLUMNS)
    assert len(table) == 3 * 5 * 2
    row = table[(table.layer == 7) & (table["head"] == 8) & (table.metric == "self")]
    assert row.value.item() == pytest.approx(np.mean(np.diagonal(att[2, 3])))
    with pytest.raises(AttnpipeError, match="layers"):
        M.long_table("t1", values_, layers=[0, 1], heads=[0, 1, 2, 3, 4])


def test_aggregate_mean_std_and_seeded_bootstrap():
    rng = np.random.default_rng(1)
    rows = []
    for t in range(40):
        for head in (0, 1):
            rows.append((f"t{t}", 0, head, "entropy", rng.normal(loc=head * 10, scale=1)))
    rows.append(("t0", 0, 0, "next_token", np.nan))
    rows.append(("t1", 0, 0, "next_token", 0.25))
    long = pd.DataFrame(rows, columns=M.LONG_COLUMNS)
    agg = M.aggregate(long)
    again = M.aggregate(long)
    pd.testing.assert_frame_equal(agg, again)  # seeded
    for head in (0, 1):
        got = agg[(agg["head"] == head) & (agg.metric == "entropy")].iloc[0]
        vals = long[(long["head"] == head) & (long.metric == "entropy")].value
        assert got.n_texts == 40
        assert got["mean"] == pytest.approx(vals.mean()) and got["std"] == pytest.approx(vals.std(ddof=1))
        assert got.ci_low < got["mean"] < got.ci_high
        assert got.ci_high - got.ci_low == pytest.approx(2 * 1.96 * vals.std() / math.sqrt(40), rel=0.3)
    nxt = agg[agg.metric == "next_token"].iloc[0]
    assert nxt.n_texts == 1 and nxt["mean"] == 0.25 and np.isnan(nxt["std"])
    assert nxt.ci_low == nxt.ci_high == 0.25


def test_positional_label_and_layer_summary(impl):
    n = 20  # uniform over 20 keys puts (5n - 6) / n^2 = 0.235 within LOCAL_WINDOW = 2
    att = np.stack([np.eye(n), np.full((n, n), 1 / n)])[None]  # (1, 2, n, n)
    long = M.long_table("t", head_metrics(impl, att, tuple("x" * n)), layers=[3], heads=[0, 1])
    agg = M.aggregate(long)
    labels = agg[agg.metric == "local_share"].set_index("head").label
    assert labels[0] == "local" and labels[1] == "global"
    summary = M.layer_summary(long)
    assert list(summary.index) == [3]
    assert summary.loc[3, "Avg entropy"] == pytest.approx(math.log(n) / 2)
    assert summary.loc[3, "Avg max attention"] == pytest.approx((1 + 1 / n) / 2)
    assert summary.loc[3, "Diagonal strength"] == pytest.approx((1 + 1 / n) / 2)
