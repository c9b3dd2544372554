"""corpus_metrics over windows of texts: a window's texts read at once (AttentionFile.metric_windows),
grouped by length and causality, computed as batches of one tensor each.

The per-text path it replaces is fast_metrics.text_values (one text's layers as a batch) on each
text as the reader returns it; metric_reference.corpus_metrics is the float64 oracle.
"""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest

from attnpipe import store
from attnpipe.analyze import fast_metrics
from attnpipe.analyze import metric_reference as R
from attnpipe.errors import AttnpipeError
from attnpipe.store import reader
from attnpipe.store.reader import distinct_tokens

PROV = store.Provenance(model="m", model_type="bert", weights_sha256="0" * 64, weight_files=("w",), num_layers=3,
                        num_heads=4, layers=(0, 2), heads=(0, 1, 3), dtype="float32", compute_dtype="float32",
                        method="manual", max_length=64, trust_remote_code=False)
WORDS = ("the", ",", "ünï", "##s", "!", "[SEP]", "Ġ.", "cat", "«", "")  # punctuation, sub-words, an empty token
# Lengths with runs of equal lengths, an empty text, one token, and lengths a padded batch mixes.
LENGTHS = [5, 5, 5, 0, 1, 9, 9, 12, 5, 11, 2, 9, 30, 5, 5]


def softmax(rng, shape, causal: bool) -> np.ndarray:
    x = np.exp(rng.standard_normal(shape) * 3).astype(np.float32)
    if causal:
        x = np.tril(x)
    return x / x.sum(axis=-1, keepdims=True)


def synthetic(rng, n: int, index: int) -> store.TextAttention:
    """Every third text causal (so one length holds both kinds); special tokens at 0, the end and
    sometimes in between; tokens drawn from WORDS."""
    tokens = tuple(["[CLS]", *(WORDS[k] for k in rng.integers(0, len(WORDS), max(n - 2, 0))), "[SEP]"][:n])
    special = np.array([i == 0 or i == n - 1 or tokens[i] == "[SEP]" and i % 2 == 0 for i in range(n)], bool)
    return store.TextAttention(
        id=f"t{index}", text=" ".join(tokens), tokens=tokens, token_ids=np.arange(n), special_tokens_mask=special,
        offsets=np.zeros((n, 2), np.int64), word_ids=np.arange(n), truncated=False, num_tokens_untruncated=n,
        attention=softmax(rng, (2, 3, n, n), causal=index % 3 == 0))


def write(path, items, dtype="float32", version=3, order=None, rows="all"):
    storage = store.Storage(dtype=dtype, schema_version=version, rows=rows)
    with store.h5_writer(path, len(items), dtype, storage) as writer:
        for i in order if order is not None else range(len(items)):
            item = items[i]
            if rows != "all" and item.num_tokens:
                positions = store.query_positions(rows, item.num_tokens)
                item = dataclasses.replace(item, attention=item.attention[:, :, positions], query_positions=positions)
            writer.write(i, item)
        writer.finish(dataclasses.replace(PROV, dtype=dtype))
    return path


def per_text(f, causal) -> np.ndarray:
    """(texts, L, H, M): text_values of each text, read one at a time."""
    names = tuple(R.METRICS)
    return np.stack([fast_metrics.text_values(item.attention, item.tokens, item.special_tokens_mask, causal=causal,
                                              names=names) for item in f])


def reference(f, causal) -> np.ndarray:
    """(texts, L, H, M): metric_reference.head_metrics of each text (NaN for the empty text, which
    numpy's max over no keys refuses)."""
    out = np.full((len(f), len(f.meta.layers), len(f.meta.heads), len(R.METRICS)), np.nan)
    for i, item in enumerate(f):
        if item.num_tokens:
            per_head = R.head_metrics(item.attention, item.tokens, item.special_tokens_mask, causal=causal)
            out[i] = np.stack([per_head[name] for name in R.METRICS], axis=-1)
    return out


def values_of(table, f) -> np.ndarray:
    return table["value"].to_numpy().reshape(len(f), len(f.meta.layers), len(f.meta.heads), len(R.METRICS))


@pytest.fixture(scope="module")
def items():
    rng = np.random.default_rng(7)
    return [synthetic(rng, n, i) for i, n in enumerate(LENGTHS)]


# Written out of order: a version-3 file's slots then differ from the user's order, so equal
# lengths are split over several runs of slots.
ORDER = [12, 3, 0, 7, 1, 14, 5, 9, 2, 10, 6, 13, 4, 11, 8]


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("causal", [None, False, True])
def test_windows_equal_the_per_text_path_and_the_reference(tmp_path, items, dtype, causal, monkeypatch):
    path = write(tmp_path / "c.h5", items, dtype, order=ORDER)
    with store.open_attention(path) as f:
        want = per_text(f, causal)
        oracle = reference(f, causal)
        for window_values in (16 << 20, 600):  # one window; windows of a few texts (a long text alone)
            monkeypatch.setattr(fast_metrics, "WINDOW_VALUES", window_values)
            table = fast_metrics.corpus_metrics(f, workers=1, causal=causal)
            got = values_of(table, f)
            assert table["text_id"].tolist() == [t for t in f.ids for _ in range(2 * 3 * len(R.METRICS))]
            # Float32 rounding apart: padded batches and BLAS blocking sum in another order.
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
            np.testing.assert_allclose(got, oracle, rtol=2e-5, atol=2e-6)
            assert (np.isnan(got) == np.isnan(oracle)).all()
    assert np.isnan(got[LENGTHS.index(0)]).all()  # the empty text: NaN, as the reference's mean over no rows


def test_version_2_and_3_files_give_the_same_metrics(tmp_path, items):
    tables = []
    for version in (2, 3):
        with store.open_attention(write(tmp_path / f"v{version}.h5", items, "float16", version, ORDER)) as f:
            tables.append(fast_metrics.corpus_metrics(f, workers=1))
            if version == 3:
                tables.append(fast_metrics.corpus_metrics(f, workers=2))  # worker processes, shares of slots
    for table in tables[1:]:
        assert table[["text_id", "layer", "head", "metric"]].equals(tables[0][["text_id", "layer", "head", "metric"]])
        np.testing.assert_allclose(table["value"], tables[0]["value"], rtol=1e-6, atol=1e-7)


def test_metric_windows_hold_each_text_once_as_the_reader_returns_it(tmp_path, items):
    for version in (2, 3):
        with store.open_attention(write(tmp_path / f"v{version}.h5", items, "uint8", version, ORDER)) as f:
            indices = [14, 2, 3, 0, 1, 9, 8, 12]  # a subset, not in storage order
            seen = []
            for window in f.metric_windows(indices, max_values=700):
                assert len(window.positions) == 1 or window.values.size <= 700
                token_start = 0
                for k, pos in enumerate(window.positions.tolist()):
                    item = f[indices[pos]]
                    n = int(window.lengths[k])
                    matrix = window.values[window.value_offsets[k]:window.value_offsets[k + 1]]
                    np.testing.assert_array_equal(matrix.reshape(item.attention.shape), item.attention)
                    codes = window.token_codes[token_start:token_start + n]
                    assert tuple(window.tokens[c] for c in codes) == item.tokens
                    np.testing.assert_array_equal(window.special[token_start:token_start + n],
                                                  item.special_tokens_mask)
                    token_start += n
                    seen.append(pos)
            assert sorted(seen) == list(range(len(indices)))


def test_batches_of_one_length_are_slices_and_mixed_lengths_are_padded(tmp_path, items, monkeypatch):
    parts = []
    batch_values = fast_metrics._batch_values
    monkeypatch.setattr(fast_metrics, "_batch_values",
                        lambda batch, *a: parts.append([(g.n, g.causal, b - s) for g, s, b in batch.parts])
                        or batch_values(batch, *a))
    with store.open_attention(write(tmp_path / "c.h5", items, order=ORDER)) as f:
        fast_metrics.corpus_metrics(f, workers=1)
    kinds = [{causal for _, causal, _ in batch} for batch in parts]
    assert all(len(k) == 1 for k in kinds)  # causal and bidirectional texts never share a batch
    texts = sum(count for batch in parts for _, _, count in batch)
    assert texts == len(LENGTHS) - 1  # every text with tokens, once
    fives = [batch for batch in parts if batch[0][0] == 5]
    assert fives and all(len(batch) == 1 for batch in fives)  # its own length's slice (5 < 0.8 * 9)
    assert any(len({n for n, _, _ in batch}) > 1 for batch in parts)  # 11, 12 (and 9 or 30) padded together


def test_distinct_tokens_decode_each_token_once():
    tokens = ["a", "ab", "", "ü", "a", "«»", "ab", "[SEP]", ""]
    data = np.frombuffer("".join(tokens).encode(), np.uint8)
    nbytes = np.array([len(t.encode()) for t in tokens], np.int64)
    distinct, codes = distinct_tokens(data, nbytes)
    assert len(distinct) == len(set(tokens))
    assert [distinct[c] for c in codes] == tokens
    assert distinct_tokens(np.zeros(0, np.uint8), np.zeros(0, np.int64))[0] == ()


def test_distinct_tokens_map_back_to_every_token_of_300_generated_lists():
    rng = np.random.default_rng(0)
    alphabet = ["a", "b", "\u00fc", "\u00ab", "\u5b57", "\U0001f600", "#", "[SEP]", " "]
    for _ in range(300):  # tokens of 0 to ~60 bytes: one word, several words, shared prefixes
        pool = ["".join(rng.choice(alphabet, size=int(rng.integers(0, 14)))) for _ in range(int(rng.integers(1, 20)))]
        tokens = [pool[i] for i in rng.integers(0, len(pool), size=int(rng.integers(1, 80)))]
        data = np.frombuffer("".join(tokens).encode(), np.uint8)
        nbytes = np.array([len(t.encode()) for t in tokens], np.int64)
        distinct, codes = distinct_tokens(data, nbytes)
        assert len(distinct) == len(set(tokens))
        assert [distinct[c] for c in codes] == tokens


def test_distinct_tokens_sort_when_two_tokens_share_a_hash():
    tokens = ["ymckkulcbierpiir", "ycekehoub;4eN'La", "ymckkulcbierpiir"]  # 16 bytes each, one hash
    data = np.frombuffer("".join(tokens).encode(), np.uint8)
    nbytes = np.array([16, 16, 16], np.int64)
    words = reader._token_words(data, np.array([0, 16, 32]), nbytes)
    assert len(set(reader._word_hashes(words).tolist())) == 1  # the hash collides
    distinct, codes = distinct_tokens(data, nbytes)
    assert sorted(distinct) == sorted(set(tokens)) and [distinct[c] for c in codes] == tokens


def test_a_damaged_row_in_a_window_names_its_text(tmp_path, items):
    path = write(tmp_path / "c.h5", items, "float16", order=ORDER)
    with store.open_attention(path) as f:
        slot = int(f._packed.all_slots()[9])
        offsets, _ = f._packed.matrix_index()
        first = int(offsets[slot]) + 2 * LENGTHS[9]  # text t9, layer 0, head 0, query 2
    with h5py.File(path, "r+") as raw:
        raw["attention/values"][first] = raw["attention/values"][first] + np.float16(0.5)
    with store.open_attention(path) as f, \
            pytest.raises(AttnpipeError, match="sum to 1 at text 't9' layer 0 head 0 query 2"):
        fast_metrics.corpus_metrics(f, workers=1)


def test_files_of_one_query_row_are_refused_as_before(tmp_path, items):
    with store.open_attention(write(tmp_path / "cls.h5", items, rows="cls")) as f, \
            pytest.raises(AttnpipeError, match="--rows cls"):
        fast_metrics.corpus_metrics(f, workers=1)


def test_the_reused_float32_buffer_decodes_as_store_decode_bit_for_bit_but_nan_payloads():
    convert = fast_metrics._Float32Values()
    every_half = np.arange(1 << 16, dtype=np.uint16).view(np.float16)  # NaN, Inf and subnormals too
    for stored in (every_half, np.arange(256, dtype=np.uint8), every_half[:10], np.arange(7, dtype=np.uint8)):
        got, want = convert(stored), store.decode(stored)
        assert got.dtype == np.float32 and (np.isnan(got) == np.isnan(want)).all()  # (torch quiets signalling NaNs)
        assert got[~np.isnan(got)].view(np.uint32).tolist() == want[~np.isnan(want)].view(np.uint32).tolist()
    texts = [convert(np.full((1, 1, 2, 2), v, np.float16)) for v in (0.25, 0.5)]  # (L, H, n, n): never reused
    assert texts[0].ravel().tolist() == [0.25] * 4 and texts[1].ravel().tolist() == [0.5] * 4
    first = convert(np.arange(5, dtype=np.uint8))
    assert np.shares_memory(convert(np.arange(3, dtype=np.uint8)), first)  # flat windows: the buffer is reused
    assert not np.shares_memory(texts[0], texts[1])
