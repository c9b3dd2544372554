"""Schema version 3 (packed): what it stores reads back exactly as version 2 does.

Round trips compare a version-3 file with a version-2 file of the same texts, field by field:
through the writers directly for every storage option and field kind (synthetic texts, no
model), and through extraction for each input path of the runner (streamed texts, collected
encoder-decoder pairs with --explain, images). Plus: the checksum HDF5 verifies, merging as
concatenation, a damaged byte reported as one error, the plain-h5py recipe of docs/FORMAT.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT

from attnpipe import store
from attnpipe.analyze.fast_metrics import corpus_metrics
from attnpipe.errors import AttnpipeError
from attnpipe.extract.corpus import Pair, Text
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.store.merge import merge_shards
from attnpipe.store.checksum import fletcher32
from attnpipe.store.packed import CHUNK_BYTES, PackedWriter

TEXT_FIELDS = ("id", "text", "tokens", "truncated", "num_tokens_untruncated", "input_kind", "image",
               "gradient_target_value", "gradient_target_label")
ARRAY_FIELDS = ("attention", "token_ids", "special_tokens_mask", "offsets", "word_ids", "query_positions",
                "attention_grad", "head_gate_grad", "token_grad_input", "head_ablation")


def assert_same_text(a: store.TextAttention, b: store.TextAttention) -> None:
    for name in TEXT_FIELDS:
        assert getattr(a, name) == getattr(b, name), name
    for name in ARRAY_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and x.shape == y.shape, name
            np.testing.assert_array_equal(x, y, err_msg=name)
    assert (a.target is None) == (b.target is None)
    if a.target is not None:
        for field in dataclasses.fields(a.target):
            x, y = getattr(a.target, field.name), getattr(b.target, field.name)
            if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
                np.testing.assert_array_equal(x, y, err_msg=field.name)
            else:
                assert x == y, field.name


def assert_same_files(v2: Path, v3: Path) -> None:
    with store.open_attention(v2, partial_rows=True) as a, store.open_attention(v3, partial_rows=True) as b:
        assert b.storage == dataclasses.replace(a.storage, schema_version=3)
        assert dataclasses.replace(a.meta, schema_version=3) == b.meta
        assert tuple(a.ids) == tuple(b.ids) and len(a) == len(b)
        if a.metrics_only:
            import pandas as pd

            pd.testing.assert_frame_equal(a.stored_metrics(), b.stored_metrics())
            return
        for i in range(len(a)):
            assert_same_text(a[i], b[i])
            if a[i].num_tokens:
                last = len(a.meta.layers) - 1, len(a.meta.heads) - 1
                np.testing.assert_array_equal(a.head(i, *last), b.head(i, *last))
        for name in ("head_importance_mean", "head_ablation_mean"):
            x, y = a.corpus_array(name), b.corpus_array(name)
            assert (x is None) == (y is None) and (x is None or np.array_equal(x, y))


# ----------------------------------------------------------------------------- synthetic texts

PROV = store.Provenance(model="m", model_type="bert", weights_sha256="0" * 64, weight_files=("w",), num_layers=3,
                        num_heads=4, layers=(0, 2), heads=(0, 1, 3), dtype="float32", compute_dtype="float32",
                        method="manual", max_length=64, trust_remote_code=False)


def softmax(rng, shape) -> np.ndarray:
    x = np.exp(rng.standard_normal(shape) * 3).astype(np.float32)
    return x / x.sum(axis=-1, keepdims=True)


def synthetic(rng, n: int, index: int, *, rows="all", kind="text", explain=False) -> store.TextAttention:
    tokens = tuple(["[CLS]", *[f"tök{k}" for k in range(max(n - 2, 0))], "[SEP]"][:n])
    attention = softmax(rng, (2, 3, n, n))
    if rows != "all" and n:
        attention = attention[:, :, [0 if rows == "cls" else n - 1]]
    fields = {}
    if explain:
        fields = dict(attention_grad=rng.standard_normal((2, 3, n, n)).astype(np.float32),
                      head_gate_grad=rng.standard_normal((3, 4)).astype(np.float32),
                      token_grad_input=rng.standard_normal(n).astype(np.float32),
                      head_ablation=rng.standard_normal((3, 4)).astype(np.float32),
                      gradient_target_value=float(index), gradient_target_label=index - 1)
    if kind == "image":
        fields["image"] = store.ImageInfo(path=f"img/{index}.png", size=(40 + index, 60), patch_grid=(2, 2),
                                          patch_size=16)
    return store.TextAttention(
        id=f"t{index}/ü", text=f"text {index} ünïcode", tokens=tokens,
        token_ids=rng.integers(0, 100, n), special_tokens_mask=np.arange(n) % 5 == 0,
        offsets=rng.integers(-1, 9, (n, 2)), word_ids=rng.integers(-1, 9, n), truncated=bool(index % 2),
        num_tokens_untruncated=n + index % 2, attention=attention, input_kind=kind,
        query_positions=None if rows == "all" else store.query_positions(rows, n), **fields)


def write_both(folder: Path, items, storage: store.Storage, order) -> tuple[Path, Path]:
    paths = folder / "v2.h5", folder / "v3.h5"
    for path, version in zip(paths, (2, 3)):
        with store.h5_writer(path, len(items), storage.dtype, dataclasses.replace(storage, schema_version=version)) \
                as writer:
            for i in order:
                writer.write(i, items[i])
            writer.finish(dataclasses.replace(PROV, dtype=storage.dtype))
    return paths


STORAGE_OPTIONS = [
    store.Storage(),
    store.Storage(dtype="float16"),
    store.Storage(dtype="uint8", compression_level=9),
    store.Storage(dtype="float16", compression="lzf"),
    store.Storage(dtype="uint8", compression="none"),
    store.Storage(rows="cls"),
    store.Storage(dtype="float16", rows="last", compression="lzf"),
]


@pytest.mark.parametrize("storage", STORAGE_OPTIONS, ids=lambda s: f"{s.dtype}-{s.compression}-{s.rows}")
def test_every_storage_option_reads_back_as_version_2(storage, tmp_path):
    rng = np.random.default_rng(0)
    lengths = [5, 0, 1, 37, 12, 3, 90]  # an empty text; one of 90 tokens spans several chunks of the others
    items = [synthetic(rng, n, i, rows=storage.rows) for i, n in enumerate(lengths)]
    assert_same_files(*write_both(tmp_path, items, storage, order=[3, 0, 6, 1, 5, 2, 4]))


@pytest.mark.parametrize("kind", ["image", "explain", "embeddings"])
def test_every_field_kind_reads_back_as_version_2(kind, tmp_path):
    rng = np.random.default_rng(1)
    items = [synthetic(rng, n, i, kind="text" if kind == "explain" else kind, explain=kind == "explain")
             for i, n in enumerate([4, 9, 2])]
    assert_same_files(*write_both(tmp_path, items, store.Storage(dtype="float16"), order=[2, 0, 1]))


def test_streamed_chunks_in_any_order_give_the_whole_text_write(tmp_path):
    """The runner's path: several texts begun, their layers written interleaved, ended out of order."""
    rng = np.random.default_rng(2)
    storage = store.Storage(dtype="uint8", schema_version=3)
    items = [synthetic(rng, n, i) for i, n in enumerate([30, 7, 300, 11])]  # 300 tokens: one head per chunk
    whole = tmp_path / "whole.h5"
    with PackedWriter(whole, len(items), "uint8", storage) as writer:
        for i in (2, 0, 3, 1):
            writer.write(i, items[i])
        writer.finish(dataclasses.replace(PROV, dtype="uint8"))
    streamed = tmp_path / "streamed.h5"
    with PackedWriter(streamed, len(items), "uint8", storage) as writer:
        for i in (2, 0, 3, 1):
            writer.begin(i, dataclasses.replace(items[i], attention=None), 2, 3)
        for layer in (1, 0):
            for i in (1, 2, 3, 0):
                stored = store.to_storage(items[i].attention, "uint8")
                for head in range(3):
                    writer.write_chunk(i, layer, head, stored[layer:layer + 1, head:head + 1])
        for i in (3, 1, 0, 2):
            writer.end(i)
        writer.finish(dataclasses.replace(PROV, dtype="uint8"))
    assert whole.read_bytes() == streamed.read_bytes()


@pytest.mark.parametrize("storage", [store.Storage(dtype="uint8"), store.Storage(dtype="float16", rows="cls"),
                                     store.Storage(rows="last", compression="lzf")],
                         ids=lambda s: f"{s.dtype}-{s.compression}-{s.rows}")
@pytest.mark.parametrize("lengths", [[30, 7, 300, 11, 1, 5, 9], [30, 0, 300, 11, 1, 0, 9]], ids=["texts", "empty"])
def test_batches_begun_together_give_the_whole_text_write(storage, lengths, tmp_path):
    """The runner's batched path (begin_batch / write_layer / end_batch: one call per batch and layer)
    writes the same bytes as whole texts one by one: two batches in flight at once, layers out of order.
    Texts without tokens end at their begin, so their chunks reach the file in another order: then
    every dataset and attribute is equal."""
    rng = np.random.default_rng(3)
    storage = dataclasses.replace(storage, schema_version=3)
    items = [synthetic(rng, n, i, rows=storage.rows) for i, n in enumerate(lengths)]
    order, batches = [2, 0, 3, 1, 6, 5, 4], [[2, 0], [3, 1, 6], [5, 4]]  # the first batch goes text by text
    whole = tmp_path / "whole.h5"
    with PackedWriter(whole, len(items), storage.dtype, storage) as writer:
        for i in order:
            writer.write(i, items[i])
        writer.finish(dataclasses.replace(PROV, dtype=storage.dtype))
    batched = tmp_path / "batched.h5"
    with PackedWriter(batched, len(items), storage.dtype, storage) as writer:
        for batch in batches[:2]:
            writer.begin_batch(batch, [dataclasses.replace(items[i], attention=None) for i in batch], 2, 3)
        for layer, batch in ((1, batches[1]), (0, batches[0]), (0, batches[1]), (1, batches[0])):
            writer.write_layer(batch[0], layer, np.concatenate(
                [store.to_storage(items[i].attention[layer], storage.dtype).reshape(-1) for i in batch]))
        writer.end_batch(batches[1][0])
        writer.begin_batch(batches[2], [dataclasses.replace(items[i], attention=None) for i in batches[2]], 2, 3)
        for layer in (0, 1):
            writer.write_layer(batches[2][0], layer, np.concatenate(
                [store.to_storage(items[i].attention[layer], storage.dtype).reshape(-1) for i in batches[2]]))
        for batch in (batches[0], batches[2]):
            writer.end_batch(batch[0])
        writer.finish(dataclasses.replace(PROV, dtype=storage.dtype))
    if 0 not in lengths:
        assert whole.read_bytes() == batched.read_bytes()
    with h5py.File(whole, "r") as a, h5py.File(batched, "r") as b:
        names = []
        a.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
        assert names and all(np.array_equal(a[name][()], b[name][()]) for name in names)
        assert {k: str(v) for k, v in a.attrs.items()} == {k: str(v) for k, v in b.attrs.items()}


@pytest.mark.parametrize("storage", [store.Storage(), store.Storage(dtype="float16"), store.Storage(dtype="uint8")],
                         ids=lambda s: s.dtype)
def test_chunks_compressed_by_several_threads_are_the_same_bytes(storage, tmp_path):
    """encode_threads > 1 (a pool compressing a flush's chunks side by side): the same file as one
    thread, with texts large enough for many chunks per flush."""
    rng = np.random.default_rng(5)
    storage = dataclasses.replace(storage, schema_version=3)
    items = [synthetic(rng, n, i) for i, n in enumerate([300, 7, 420, 33])]
    files = []
    for threads in (1, 3):
        path = tmp_path / f"{threads}.h5"
        with PackedWriter(path, len(items), storage.dtype, storage, encode_threads=threads) as writer:
            for i, item in enumerate(items):
                writer.write(i, item)
            writer.finish(dataclasses.replace(PROV, dtype=storage.dtype))
        files.append(path.read_bytes())
    assert files[0] == files[1]
    with h5py.File(tmp_path / "3.h5", "r") as f:
        assert f["attention/values"].id.get_num_chunks() > 4


# Characters of 1 to 4 UTF-8 bytes (and one that NFC would compose): mixed within a batch, a string
# of one kind beside strings of another, and empty strings.
STRING_PARTS = ("a", "Z9 ", "", "é", "e\u0301", "中文", "€", "🙂", "\u00a0", "ß")


def test_generated_strings_of_any_utf8_mix_read_back_from_batches(tmp_path):
    """300 texts in batches of up to 40, whose ids, texts and tokens mix ASCII and 2-, 3- and 4-byte
    characters at random (all-ASCII batches too): every string reads back as written."""
    rng = np.random.default_rng(11)

    def word(ascii_only: bool) -> str:
        parts = STRING_PARTS[:3] if ascii_only else STRING_PARTS
        return "".join(parts[k] for k in rng.integers(0, len(parts), rng.integers(0, 5)))

    items = []
    for i in range(300):
        ascii_only = (i // 40) % 3 == 0  # every third batch is all ASCII
        n = int(rng.integers(0, 6))
        items.append(store.TextAttention(
            id=f"{i}:{word(ascii_only)}", text=word(ascii_only), tokens=tuple(word(ascii_only) for _ in range(n)),
            token_ids=np.arange(n), special_tokens_mask=np.zeros(n, bool), offsets=np.zeros((n, 2), np.int64),
            word_ids=np.zeros(n, np.int64), truncated=False, num_tokens_untruncated=n, attention=None))
    storage = store.Storage(schema_version=3)
    path = tmp_path / "strings.h5"
    with PackedWriter(path, len(items), storage.dtype, storage) as writer:
        for start in range(0, len(items), 40):
            batch = list(range(start, min(start + 40, len(items))))
            writer.begin_batch(batch, [items[i] for i in batch], 2, 3)
            uniform = [np.full(3 * len(items[i].tokens) ** 2, 1 / max(len(items[i].tokens), 1), np.float32)
                       for i in batch]  # (H, n, n) rows of 1/n: what the reader's row check accepts
            for layer in (0, 1):
                writer.write_layer(batch[0], layer, np.concatenate(uniform))
            writer.end_batch(batch[0])
        writer.finish(PROV)
    with store.open_attention(path) as f:
        assert list(f.ids) == [item.id for item in items]
        for i, item in enumerate(items):
            back = f[i]
            assert (back.text, back.tokens) == (item.text, item.tokens), i


def test_a_batch_missing_a_layer_or_with_values_that_do_not_fit_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    storage = store.Storage(dtype="float16", schema_version=3)
    items = [dataclasses.replace(synthetic(rng, n, i), attention=None) for i, n in enumerate([4, 6, 3])]
    with PackedWriter(tmp_path / "a.h5", 3, "float16", storage) as writer:
        writer.begin_batch([0], items[:1], 2, 3)
        writer.begin_batch([1, 2], items[1:], 2, 3)
        with pytest.raises(ValueError, match="do not fit"):
            writer.write_layer(1, 0, np.zeros(3 * 36 + 3 * 9 - 1, np.float16))
        writer.write_layer(1, 0, np.zeros(3 * 36 + 3 * 9, np.float16))
        with pytest.raises(RuntimeError, match="1 of 2 layers"):
            writer.end_batch(1)
    assert not (tmp_path / "a.h5").exists()


def test_fletcher32_is_hdf5s(tmp_path):
    """The checksum written beside each direct chunk is the one HDF5 computes (and verifies on read)."""
    rng = np.random.default_rng(3)
    # sizes on both sides of 2^19 words (1 MiB), where fletcher32 stops reusing its cached weights
    for data in [rng.integers(0, 256, n, dtype=np.uint8) for n in (1, 2, 719, 720, 721, 50_001, 1 << 20, (1 << 20) + 3)] + \
            [np.full(70_000, 255, np.uint8), np.zeros(1001, np.uint8)]:
        with h5py.File(tmp_path / "f.h5", "w") as f:
            f.create_dataset("x", data=data, chunks=(len(data),), fletcher32=True)
        with h5py.File(tmp_path / "f.h5") as f:
            _, raw = f["x"].id.read_direct_chunk((0,))
        assert raw[:-4] == data.tobytes() and int.from_bytes(raw[-4:], "little") == fletcher32(data.tobytes())


def test_layout_is_packed_checked_and_one_matrix_spans_at_most_two_chunks(tmp_path, monkeypatch):
    from attnpipe.store import packed

    monkeypatch.setattr(packed, "FLUSH_SLOTS", 16)  # small fields go to the file many times
    rng = np.random.default_rng(4)
    items = [synthetic(rng, n, i) for i, n in enumerate(rng.integers(1, 120, 80))]
    v2, v3 = write_both(tmp_path, items, store.Storage(), order=rng.permutation(len(items)).tolist())
    assert_same_files(v2, v3)
    with h5py.File(v3) as f:
        datasets = []
        f.visititems(lambda name, obj: datasets.append(obj) if isinstance(obj, h5py.Dataset) else None)
        assert len(datasets) < 45  # 80 texts, the same few datasets as one
        for dataset in datasets:
            assert dataset.fletcher32, dataset.name
            assert dataset.dtype.kind != "O", dataset.name  # no variable-length strings (no checksum)
        values, offsets, shapes = (f["attention"][name][()] for name in ("values", "offsets", "shape"))
        chunk = f["attention/values"].chunks[0]
        assert chunk * values.itemsize == CHUNK_BYTES
        for start, (layers, heads, rows, n) in zip(offsets[:-1], shapes):
            for k in range(layers * heads):
                first = start + k * rows * n
                assert (first + rows * n - 1) // chunk - first // chunk <= 1


@pytest.mark.parametrize("storage", [store.Storage(), store.Storage(dtype="float16"),
                                     store.Storage(dtype="uint8", compression="none"),
                                     store.Storage(dtype="float16", compression="lzf")],
                         ids=lambda s: f"{s.dtype}-{s.compression}")
def test_one_matrix_reads_exactly_across_chunk_edges_and_checks_each_chunk(storage, tmp_path, monkeypatch):
    """head() reads chunks itself (codec.ChunkRanges, fletcher32 checked, inflated only as far as
    needed): every (text, layer, head) equals the whole text's matrix, with 1 KiB chunks that
    matrices straddle; a damaged chunk, slot map or index is one error before any value is used."""
    from attnpipe.store import packed

    monkeypatch.setattr(packed, "CHUNK_BYTES", 1 << 10)
    rng = np.random.default_rng(11)
    items = [synthetic(rng, n, i) for i, n in enumerate([1, 9, 17, 4, 30, 2, 12])]
    _, v3 = write_both(tmp_path, items, storage, order=[3, 0, 6, 1, 5, 2, 4])
    with store.open_attention(v3) as f:
        assert f._packed.matrix_index()[0][-1] > 8 * (1 << 10) // np.dtype(storage.dtype).itemsize  # many chunks
        for i in rng.permutation(len(items)).tolist():  # out of file order: the kept chunks change
            whole = f[i].attention
            for layer in range(whole.shape[0]):
                for head in range(whole.shape[1]):
                    got = f.head(i, layer, head)
                    assert got.dtype == np.float32
                    np.testing.assert_array_equal(got, whole[layer, head])
    if storage.compression == "lzf":
        return  # read through h5py, which checks the same way
    with h5py.File(v3) as f:
        info = f["attention/values"].id.get_chunk_info(3)
        chunk_start = info.chunk_offset[0]
        offsets, slots = f["attention/offsets"][()], f["texts/slot"][()]
    slot = int(np.searchsorted(offsets, chunk_start, side="right")) - 1  # a text with values in chunk 3
    text = int(np.flatnonzero(slots == slot)[0])
    raw = bytearray(v3.read_bytes())
    raw[info.byte_offset + 5] ^= 0xFF
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes(bytes(raw))
    with store.open_attention(damaged) as f, pytest.raises(AttnpipeError, match="fletcher32|damaged") as err:
        for layer in range(2):
            for head in range(3):
                f.head(text, layer, head)
    assert str(damaged) in str(err.value) and "\n" not in str(err.value)
    for path, dataset, value in (("slot", "texts/slot", 0), ("index", "attention/offsets", 7)):
        broken = tmp_path / f"{path}.h5"
        broken.write_bytes(v3.read_bytes())
        with h5py.File(broken, "r+") as f:
            data = f[dataset][()]
            data[1] = value  # slot 0 twice / an offset that does not match its shape
            f[dataset][...] = data
        with store.open_attention(broken) as f, pytest.raises(AttnpipeError, match="damaged attention file"):
            f.head(0, 0, 0)


def test_a_damaged_byte_is_one_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(5)
    items = [synthetic(rng, 40, i) for i in range(3)]
    _, v3 = write_both(tmp_path, items, store.Storage(), order=range(3))
    with h5py.File(v3) as f:
        where = f["attention/values"].id.get_chunk_info(0).byte_offset
    raw = bytearray(v3.read_bytes())
    raw[where + 100] ^= 0xFF
    v3.write_bytes(bytes(raw))
    with store.open_attention(v3) as f, pytest.raises(AttnpipeError, match=re.escape(str(v3))) as err:
        f[0]
    assert "\n" not in str(err.value)


def test_merging_version_3_shards_is_a_concatenation(tmp_path):
    rng = np.random.default_rng(6)
    items = [synthetic(rng, n, i) for i, n in enumerate([3, 8, 1, 20, 6])]
    whole_v2, _ = write_both(tmp_path, items, store.Storage(dtype="float16"), order=[4, 2, 0, 3, 1])
    shards = []
    for k, part in enumerate((items[:2], items[2:])):
        shard = tmp_path / f"shard{k}.h5"
        with PackedWriter(shard, len(part), "float16", store.Storage(dtype="float16", schema_version=3)) as writer:
            for i in reversed(range(len(part))):
                writer.write(i, part[i])
            writer.finish(dataclasses.replace(PROV, dtype="float16"))
        shards.append(shard)
    merged = tmp_path / "merged.h5"
    assert merge_shards(shards, merged) == len(items)
    assert_same_files(whole_v2, merged)
    with pytest.raises(AttnpipeError, match="mix schema version 3"):
        merge_shards([shards[0], whole_v2], tmp_path / "mixed.h5")
    assert not (tmp_path / "mixed.h5").exists()


# ----------------------------------------------------------------------------- through extraction

TEXTS = tuple(Text(f"t{i}", " ".join(["the big cat sat on the mat"] * (1 + i % 4))[: 8 + 9 * i])
              for i in range(12))


def extract_both(tmp_path: Path, **config) -> tuple[Path, Path]:
    paths = tmp_path / "v2.h5", tmp_path / "v3.h5"
    for path, version in zip(paths, (2, 3)):
        extract(ExtractConfig(output=path, progress=False, schema_version=version, batch_size=5, **config))
    return paths


@pytest.mark.parametrize("options", [dict(dtype="float16"), dict(dtype="uint8", rows="cls"),
                                     dict(metrics_only=True)], ids=["float16", "uint8-cls", "metrics-only"])
def test_extraction_of_texts_streams_into_version_3(tiny_model_dir, tmp_path, options):
    assert_same_files(*extract_both(tmp_path, texts=TEXTS, model_dir=tiny_model_dir("bert"), **options))


def test_extraction_of_causal_texts_and_metrics_agree(tiny_model_dir, tmp_path):
    v2, v3 = extract_both(tmp_path, texts=TEXTS, model_dir=tiny_model_dir("gpt2"))
    assert_same_files(v2, v3)
    with store.open_attention(v2) as a, store.open_attention(v3) as b:
        import pandas as pd

        pd.testing.assert_frame_equal(corpus_metrics(a, workers=1), corpus_metrics(b, workers=1))


def test_extraction_of_pairs_with_explain_into_version_3(tmp_path):
    from seq2seq_tiny import save_tiny_seq2seq

    model_dir = save_tiny_seq2seq("bart", tmp_path / "bart", lm_head=True)
    pairs = (Pair("p0", "the cat sat", "a dog ran"), Pair("p1", "it was red and big", "the mat"))
    assert_same_files(*extract_both(tmp_path, pairs=pairs, model_dir=model_dir, explain="output-norm"))


def test_extraction_of_images_into_version_3(tiny_vit_dir, tmp_path):
    from conftest import write_test_images

    images = tuple(write_test_images(tmp_path / "images"))
    assert_same_files(*extract_both(tmp_path, images=images, model_dir=tiny_vit_dir))


def test_plain_h5py_recipe_of_version_3_runs(tiny_model_dir, tmp_path):
    path = tmp_path / "doc.h5"
    extract(ExtractConfig(texts=(Text("a", "the cat sät"), Text("b", "a dog ran far away")), output=path,
                          model_dir=tiny_model_dir("bert"), progress=False, schema_version=3))
    doc = (ROOT / "docs" / "FORMAT.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(r"^```python\n(.*?)^```", doc, re.S | re.M) if "# schema version 3" in b]
    assert len(blocks) == 1 and "attnpipe" not in blocks[0].replace('"attnpipe-attention"', "")
    namespace = {"path": str(path)}
    exec(compile(blocks[0], "docs/FORMAT.md", "exec"), namespace)  # noqa: S102 - our own documentation
    with store.open_attention(path) as f:
        assert namespace["text"] == "the cat sät" and namespace["tokens"] == list(f[0].tokens)
        np.testing.assert_array_equal(namespace["matrix"], f.head(0, len(f.meta.layers) - 1, 0))


@pytest.mark.slow  # a Python process that imports torch, killed mid-write
def test_a_killed_version_3_writer_leaves_no_file(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(t.text for t in TEXTS) + "\n", encoding="utf-8")
    out = tmp_path / "out.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ATTNPIPE_FAULT_AT": "write:4"}
    proc = subprocess.run([sys.executable, str(ROOT / "extract_attention.py"), "--model_dir",
                           str(tiny_model_dir("bert")), "--texts-file", str(texts), "--output_file", str(out),
                           "--schema-version", "3", "--batch-size", "3", "-q"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == -9, proc.stderr
    assert not out.exists()
    assert all(p.name.startswith(".out.h5.") and p.suffix == ".tmp" for p in tmp_path.glob("*out.h5*"))


def test_metrics_in_worker_processes_read_version_3_in_file_order(tmp_path):
    """Workers take shares of the texts as the file holds them; the table keeps the user's order."""
    import pandas as pd

    rng = np.random.default_rng(7)
    items = [synthetic(rng, n, i) for i, n in enumerate(rng.integers(1, 30, 40))]
    v2, v3 = write_both(tmp_path, items, store.Storage(), order=rng.permutation(len(items)).tolist())
    with store.open_attention(v2) as a, store.open_attention(v3) as b:
        assert sorted(b.storage_order().tolist()) == list(range(len(items)))
        pd.testing.assert_frame_equal(corpus_metrics(a, workers=2), corpus_metrics(b, workers=2))
        pd.testing.assert_frame_equal(corpus_metrics(a, workers=1), corpus_metrics(b, workers=2))
