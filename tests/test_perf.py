"""Corpus-scale extraction: storage options, token-budget batching, streaming, metrics-only, estimate.

Correctness only; speed is measured in bench/bench_extract.py.
"""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from attnpipe.analyze import metrics as M
from attnpipe.analyze import metric_reference as R  # the numpy oracle
from attnpipe import store
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import batches, token_budget_batches
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.store.packed import PackedWriter
from attnpipe.analyze.fast_metrics import BatchMetrics
from conftest import run_script

TEXTS = (
    Text("short", "the cat"),
    Text("long", "the big red dog ran fast on the mat and the cat was slow , it is blue !"),
    Text("mid", "a dog sat , it was small"),
    Text("one", "ran"),
    Text("mid2", "the mat is red and big ."),
)


def run(model_dir, output, **kw):
    extract(ExtractConfig(texts=kw.pop("texts", TEXTS), output=output, model_dir=model_dir, progress=False, **kw))
    return output


def test_uint8_round_trip_error_and_decoding(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("bert")
    full = run(model_dir, tmp_path / "f32.h5")
    small = run(model_dir, tmp_path / "u8.h5", dtype="uint8", schema_version=2)  # read below by v2 path
    with store.open_attention(full) as f32, store.open_attention(small) as u8:
        assert u8.meta.dtype == "uint8" and u8.storage.dtype == "uint8"
        worst = 0.0
        for a, b in zip(f32, u8, strict=True):
            assert b.attention.dtype == np.float32
            worst = max(worst, float(np.abs(a.attention - b.attention).max()))
            # The decoded value is exactly v / 255 for the stored integer v.
            np.testing.assert_array_equal(b.attention * 255, np.round(b.attention * 255))
        assert 0 < worst <= 0.5 / 255 + 1e-6  # round(p * 255) / 255 is within half a step of p
        assert u8.head("long", 1, 2).dtype == np.float32
    with h5py.File(small) as raw:
        dataset = raw["texts/00000001/attention"]
        assert dataset.dtype == np.uint8 and dataset.attrs["scale"] == pytest.approx(1 / 255)


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_compression_choices_read_back_the_same(tiny_model_dir, tmp_path, compression):
    model_dir = tiny_model_dir("bert")
    ref = run(model_dir, tmp_path / "ref.h5", dtype="float16")
    other = run(model_dir, tmp_path / "x.h5", dtype="float16", compression=compression,
                compression_level=1 if compression == "gzip" else None)
    with store.open_attention(ref) as a, store.open_attention(other) as b:
        assert b.storage.compression == compression
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(x.attention, y.attention)


@pytest.mark.parametrize("level", [0, 1, 3, 4, 6, 12])
def test_every_gzip_level_writes_chunks_plain_hdf5_reads(tiny_model_dir, tmp_path, level):
    """Levels 0-3 (ISA-L) and 4-12 (libdeflate) must make standard zlib streams: HDF5's own
    deflate filter (plain h5py) and Python's zlib decode them to the values we meant to store."""
    import zlib

    model_dir = tiny_model_dir("bert")
    ref = run(model_dir, tmp_path / "ref.h5", dtype="float32", compression="none")
    path = run(model_dir, tmp_path / "x.h5", dtype="uint8" if level > 3 else "float16", compression_level=level,
               schema_version=2)  # per-text datasets below (tests/test_packed.py: version 3's)
    with store.open_attention(ref) as a, h5py.File(path) as raw:
        assert raw.attrs["compression_level"] == level
        for index, want in enumerate(a):
            dataset = raw[f"texts/{index:08d}/attention"]
            assert dataset.compression == "gzip"
            expected = store.to_storage(want.attention, "uint8") if level > 3 else want.attention.astype(np.float16)
            np.testing.assert_array_equal(dataset[()], expected)  # decoded by HDF5, not by us
            _, chunk = dataset.id.read_direct_chunk((0, 0, 0, 0))
            assert len(zlib.decompress(chunk)) == np.prod(dataset.chunks) * dataset.dtype.itemsize


def test_gzip_level_out_of_range_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(AttnpipeError, match="--compression-level 13 is out of range: use 0-12"):
        run(tiny_model_dir("bert"), tmp_path / "x.h5", compression_level=13)
    assert not (tmp_path / "x.h5").exists()


def test_rows_subset_round_trip_and_refusal(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("gpt2")
    full = run(model_dir, tmp_path / "all.h5")
    for rows in ("cls", "last"):
        path = run(model_dir, tmp_path / f"{rows}.h5", rows=rows)
        with store.open_attention(path) as f:
            assert f.storage.rows == rows
            with pytest.raises(AttnpipeError, match=f"only the '{rows}' query row"):
                f[0]
        with store.open_attention(path, partial_rows=True) as f, store.open_attention(full) as ref:
            for got, want in zip(f, ref, strict=True):
                n = want.num_tokens
                position = 0 if rows == "cls" else n - 1
                np.testing.assert_array_equal(got.query_positions, [position])
                np.testing.assert_array_equal(got.attention, want.attention[:, :, [position], :])
                np.testing.assert_array_equal(f.head(got.id, 1, 3), want.attention[1, 3, [position]])
    result = run_script("analyze_attention.py", "metrics", tmp_path / "cls.h5", "--output-dir", tmp_path / "m")
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "--rows all" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])  # bidirectional and causal
def test_metrics_only_equals_metrics_of_the_full_file(tiny_model_dir, tmp_path, model_type):
    model_dir = tiny_model_dir(model_type)
    full = run(model_dir, tmp_path / "full.h5", max_tokens_per_batch=40)
    only = run(model_dir, tmp_path / "only.h5", metrics_only=True, max_tokens_per_batch=40)
    with store.open_attention(full) as f:
        want = R.corpus_metrics(f)
    with store.open_attention(only) as f:
        assert f.metrics_only
        got = f.stored_metrics()
        with pytest.raises(AttnpipeError, match="metrics only"):
            f[0]
    assert list(got.columns) == list(want.columns)
    pd_cols = ["text_id", "layer", "head", "metric"]
    assert got[pd_cols].astype(str).equals(want[pd_cols].astype(str))
    # Per-row values in float32 (fast_metrics) against numpy's float64: ~1e-7 relative apart.
    np.testing.assert_allclose(got["value"], want["value"], rtol=2e-5, atol=2e-6)
    assert (got["value"].isna() == want["value"].isna()).all()
    # analyze_attention.py metrics returns the stored table.
    result = run_script("analyze_attention.py", "metrics", only, "--output-dir", tmp_path / "m", "--bootstrap", "10")
    assert result.returncode == 0, result.stderr
    import pandas as pd

    table = pd.read_parquet(tmp_path / "m" / "metrics.parquet")
    np.testing.assert_allclose(table["value"], got["value"])


def test_fast_metrics_match_numpy_on_a_padded_batch():
    rng = np.random.default_rng(1)
    lengths = [7, 5, 1, 3]
    tokens = [("[CLS]", "a", ",", "b", "##c", "!", "[SEP]")[:n] for n in lengths]
    special = [np.array([i == 0 or i == n - 1 for i in range(n)]) for n in lengths]
    for causal in (False, True):
        t = max(lengths)
        logits = torch.from_numpy(rng.normal(size=(len(lengths), 3, t, t)).astype(np.float32) * 3)
        blocked = torch.arange(t)[None, :] >= torch.tensor(lengths)[:, None]  # padded keys
        logits = logits.masked_fill(blocked[:, None, None, :], float("-inf"))
        if causal:
            logits = logits.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
        probs = torch.softmax(logits, -1)
        got = BatchMetrics(tuple(M.METRICS), lengths, tokens, special, causal=causal).layer(probs)
        for row, n in enumerate(lengths):
            a = probs[row, :, :n, :n].numpy()[None]  # (1, H, n, n)
            want = R.head_metrics(a, tokens[row], special[row], causal=causal)
            for m, name in enumerate(M.METRICS):
                np.testing.assert_allclose(got[row, :, m], want[name][0], rtol=1e-5, atol=1e-6,
                                           err_msg=f"{name} causal={causal} n={n}")


def test_token_budget_batches_and_output_order(tiny_model_dir, tmp_path):
    lengths = [3, 10, 4, 10, 1, 7]
    grouped = list(token_budget_batches(lengths, max_tokens=20, max_texts=3))
    assert sorted(i for b in grouped for i in b) == list(range(len(lengths)))
    for batch in grouped:
        widest = max(lengths[i] for i in batch)
        assert len(batch) == 1 or len(batch) * widest <= 20
        assert len(batch) <= 3
    assert list(token_budget_batches([50, 2], max_tokens=20, max_texts=8)) == [[0], [1]]  # too long: alone
    # The attention budget (texts x width^2 per head) splits long texts into smaller batches
    # than short ones; a text over it goes alone.
    lengths = [10, 10, 10, 10, 5, 5, 5, 5, 30]
    grouped = list(token_budget_batches(lengths, max_tokens=1000, max_texts=8, max_cells=200))
    assert grouped == [[8], [0, 1], [2, 3], [4, 5, 6, 7]]
    assert list(token_budget_batches(lengths, max_tokens=1000, max_texts=8)) == [[8, 0, 1, 2, 3, 4, 5, 6]] + [[7]]
    # extract's batches: --batch-attention-mb is one layer's float32 attention (x heads x 4 bytes).
    config = ExtractConfig(texts=(), output=tmp_path / "x.h5", max_tokens_per_batch=1000, batch_size=8,
                           batch_attention_mb=200 * 12 * 4 / 2**20)
    assert list(batches(lengths, config, num_heads=12)) == [[8], [0, 1], [2, 3], [4, 5, 6, 7]]
    model_dir = tiny_model_dir("bert")
    budget = run(model_dir, tmp_path / "budget.h5", max_tokens_per_batch=12)
    alone = run(model_dir, tmp_path / "alone.h5", batch_size=1)
    with store.open_attention(budget) as a, store.open_attention(alone) as b:
        assert a.ids == tuple(t.id for t in TEXTS)
        for x, y in zip(a, b, strict=True):
            assert x.tokens == y.tokens
            # Padding changes BLAS blocking, not the result beyond float32 rounding.
            np.testing.assert_allclose(x.attention, y.attention, atol=1e-5, rtol=0)


def test_streaming_gives_the_same_file_as_the_in_memory_path(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("gpt2")  # max 64 positions: a text at the limit is its "long input"
    texts = (Text("longest", " ".join(["the cat sat on the mat"] * 12)), *TEXTS)  # ids unique: the reader checks
    for dtype in ("float16", "uint8"):
        streamed = run(model_dir, tmp_path / f"s-{dtype}.h5", texts=texts, dtype=dtype)
        in_memory = run(model_dir, tmp_path / f"m-{dtype}.h5", texts=texts, dtype=dtype, stream_layers=False)
        assert streamed.read_bytes() == in_memory.read_bytes()
    with store.open_attention(tmp_path / "s-float16.h5") as f:
        assert f["longest"].truncated and f["longest"].num_tokens == 62


def test_writer_thread_error_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    def broken(self, *args):
        raise OSError("disk full")

    monkeypatch.setattr(store.H5Writer, "write_chunk", broken)
    monkeypatch.setattr(PackedWriter, "write_chunk", broken)  # texts begun one by one
    monkeypatch.setattr(PackedWriter, "write_layer", broken)  # whole batches: what the runner uses for texts
    target = tmp_path / "out.h5"
    with pytest.raises(OSError, match="disk full"):
        run(tiny_model_dir("bert"), target)
    assert list(tmp_path.iterdir()) == []


def test_version_1_files_are_still_read(tiny_model_dir, tmp_path):
    path = run(tiny_model_dir("bert"), tmp_path / "v1.h5", schema_version=2)
    with h5py.File(path, "a") as f:  # what schema version 1 wrote: no storage attributes
        f.attrs["schema_version"] = 1
        for key in ("compression", "compression_level", "rows", "metrics_only", "attrs_crc32"):
            del f.attrs[key]  # (nor the strings' checksum, which came later)
    with store.open_attention(path) as f:
        assert f.storage == store.Storage(dtype="float32", compression_level=store.DEFAULT_GZIP_LEVEL,
                                        schema_version=2)  # the layout of versions 1 and 2
        assert f[0].attention.shape[0] == 2


def test_json_refuses_hdf5_only_options(tiny_model_dir, tmp_path):
    for kw in ({"dtype": "uint8"}, {"rows": "cls"}, {"metrics_only": True}):
        with pytest.raises(AttnpipeError, match="is for .h5 output"):
            run(tiny_model_dir("bert"), tmp_path / "a.json", texts=TEXTS[:1], **kw)


def test_estimate_prints_and_writes_nothing(tiny_model_dir, tmp_path):
    out = tmp_path / "est.h5"
    result = run_script("extract_attention.py", "--model_dir", tiny_model_dir("bert"), "--text", "the cat sat",
                        "--text", "a dog ran fast", "--dtype", "uint8", "--output_file", out, "--estimate")
    assert result.returncode == 0, result.stderr
    assert "expected output size" in result.stdout and "expected time" in result.stdout
    assert "2 text(s)" in result.stdout
    assert not out.exists()


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])  # bidirectional and causal (inferred per text)
def test_parallel_corpus_metrics_equal_the_numpy_definition(tiny_model_dir, tmp_path, model_type):
    from attnpipe.analyze import fast_metrics

    texts = tuple(Text(f"{t.id}-{i}", t.text) for i in range(8) for t in TEXTS)  # 40 texts: 2 workers
    path = run(tiny_model_dir(model_type), tmp_path / "c.h5", texts=texts, dtype="float16")
    with store.open_attention(path) as f:
        want = R.corpus_metrics(f)
        for workers in (1, 2):
            got = fast_metrics.corpus_metrics(f, workers=workers)
            assert list(got.columns) == list(want.columns)
            keys = ["text_id", "layer", "head", "metric"]
            assert got[keys].astype(str).equals(want[keys].astype(str))
            # Per-row float32 against numpy's float64 (module docstring of attnpipe.analyze.fast_metrics).
            np.testing.assert_allclose(got["value"], want["value"], rtol=2e-5, atol=2e-6)
            assert (got["value"].isna() == want["value"].isna()).all()


@pytest.mark.parametrize("model_type", ["bert", "gpt2"])
def test_corpus_metrics_on_padded_batches_of_mixed_lengths(tiny_model_dir, tmp_path, monkeypatch, model_type):
    """Texts of different lengths computed as one padded batch give numpy's values."""
    from attnpipe.analyze import fast_metrics

    monkeypatch.setattr(fast_metrics, "MIN_LENGTH_SHARE", 0.0)  # any lengths may share a batch
    widths = []
    batch_values = fast_metrics._batch_values
    monkeypatch.setattr(fast_metrics, "_batch_values",
                        lambda batch, *a: widths.append({t.n for t in batch}) or batch_values(batch, *a))
    path = run(tiny_model_dir(model_type), tmp_path / "c.h5", texts=TEXTS, dtype="float16")
    with store.open_attention(path) as f:
        want = R.corpus_metrics(f)
        got = fast_metrics.corpus_metrics(f, workers=1)
    assert len(widths) == 1 and len(widths[0]) >= 3, widths  # one batch, padded
    np.testing.assert_allclose(got["value"], want["value"], rtol=2e-5, atol=2e-6)
    assert (got["value"].isna() == want["value"].isna()).all()


def test_corpus_metrics_batches_stay_within_their_value_budget(tiny_model_dir, tmp_path, monkeypatch):
    """A batch holds as many texts as BATCH_VALUES allows at its longest text's L·H·n² values each."""
    from attnpipe.analyze import fast_metrics

    path = run(tiny_model_dir("bert"), tmp_path / "c.h5", texts=TEXTS, dtype="float16")
    with store.open_attention(path) as f:
        longest = max(f[i].attention.size for i in range(len(f)))
        monkeypatch.setattr(fast_metrics, "MIN_LENGTH_SHARE", 0.0)
        monkeypatch.setattr(fast_metrics, "BATCH_VALUES", 2 * longest)  # room for two padded texts
        sizes = []
        batch_values = fast_metrics._batch_values
        monkeypatch.setattr(fast_metrics, "_batch_values",
                            lambda batch, *a: sizes.append(len(batch)) or batch_values(batch, *a))
        fast_metrics.corpus_metrics(f, workers=1)
    assert sizes[0] == 2 and sum(sizes) == len(TEXTS), sizes


def test_parallel_corpus_metrics_report_a_damaged_text(tiny_model_dir, tmp_path):
    from attnpipe.analyze import fast_metrics

    texts = tuple(Text(f"{t.id}-{i}", t.text) for i in range(8) for t in TEXTS)
    path = run(tiny_model_dir("bert"), tmp_path / "c.h5", texts=texts, schema_version=2)  # damaged by v2 path
    with h5py.File(path, "r+") as raw:
        dataset = raw["texts/00000037/attention"]
        dataset[0, 0, 0, 0] = dataset[0, 0, 0, 0] + 0.5  # row 0 no longer sums to 1
    with store.open_attention(path) as f, pytest.raises(AttnpipeError, match="sum"):
        fast_metrics.corpus_metrics(f, workers=2)


def test_merge_shards_keeps_the_metrics_of_metrics_only_shards(tiny_model_dir, tmp_path):
    """The workflow merges shards with scripts/merge_shards.py: stored metrics must survive it."""
    model_dir = tiny_model_dir("bert")
    first = run(model_dir, tmp_path / "s0.h5", texts=TEXTS[:3], metrics_only=True)
    second = run(model_dir, tmp_path / "s1.h5", texts=TEXTS[3:], metrics_only=True)
    merged = tmp_path / "merged.h5"
    result = run_script("scripts/merge_shards.py", first, second, "--output-file", merged)
    assert result.returncode == 0, result.stderr
    with store.open_attention(merged) as got, store.open_attention(first) as a, store.open_attention(second) as b:
        assert got.metrics_only and got.ids == tuple(t.id for t in TEXTS) == a.ids + b.ids
        table = got.stored_metrics()
        expected = pd.concat([a.stored_metrics(), b.stored_metrics()], ignore_index=True)
        pd.testing.assert_frame_equal(table, expected)  # the shards' values, in order, unchanged
        np.testing.assert_array_equal(got.stored_causal(), np.concatenate([a.stored_causal(), b.stored_causal()]))
    # A metrics-only shard and a full one do not merge; nothing is written.
    full = run(model_dir, tmp_path / "full.h5", texts=TEXTS[3:])
    result = run_script("scripts/merge_shards.py", first, full, "--output-file", tmp_path / "bad.h5")
    assert result.returncode == 2 and result.stderr.startswith("error:") and "metrics_only" in result.stderr
    assert not (tmp_path / "bad.h5").exists() and not (tmp_path / "bad.h5.tmp").exists()
