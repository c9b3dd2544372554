"""Round trips through the format module: what the reader returns is what was computed."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from attnpipe import store
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.extract.loading import load_model

TEXTS = (
    Text("short", "the cat"),
    Text("long", "the big red dog ran fast on the mat and the cat was slow"),
    Text("mid", "a dog sat , it was small"),
    Text("odd id/../ü", "it is blue !"),
)


def run(model_dir: Path, output: Path, **kw) -> store.AttentionFile:
    extract(ExtractConfig(texts=kw.pop("texts", TEXTS), output=output, model_dir=model_dir, progress=False, **kw))
    return store.open_attention(output)


def expected_attention(model_dir: Path, text: str) -> np.ndarray:
    """Our forward pass on one unpadded text, (L, H, n, n)."""
    model = load_model(model_dir, torch.device("cpu"))
    enc = model.tokenizer([text], return_tensors="pt")
    with torch.inference_mode():
        out = model.family.forward(model.weights, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return torch.stack([out.attentions["self"][i][0] for i in range(model.num_layers)]).numpy()


def test_h5_round_trip_equals_computation(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("bert")
    with run(model_dir, tmp_path / "a.h5", verify=True) as f:
        assert f.ids == tuple(t.id for t in TEXTS)  # the user's order, though batches are length-sorted
        assert f.meta.parity_max_abs_diff is not None and f.meta.parity_max_abs_diff <= 1e-5
        assert f.meta.layers == (0, 1) and f.meta.heads == (0, 1, 2, 3)
        for given in TEXTS:
            item = f[given.id]
            assert item.text == given.text
            # Batched with padding vs alone: BLAS blocks the matmuls differently (~1e-6 apart).
            np.testing.assert_allclose(item.attention, expected_attention(model_dir, given.text), atol=1e-5, rtol=0)
            n = item.num_tokens
            assert item.attention.shape == (2, 4, n, n)
            assert item.special_tokens_mask[0] and item.special_tokens_mask[-1]
            assert item.word_ids[0] == -1 and item.word_ids[1] == 0
            start, end = item.offsets[1]
            assert given.text[start:end] == item.tokens[1]
            np.testing.assert_array_equal(f.head(given.id, 1, 2), item.attention[1, 2])


def test_json_round_trip_and_seed_001_keys(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("roberta")
    text = TEXTS[1]
    with run(model_dir, tmp_path / "a.json", texts=(text,), layers=("-1",), heads=("0,3",)) as f:
        item = f[0]
        full = expected_attention(model_dir, text.text)
        np.testing.assert_array_equal(item.attention, full[[-1]][:, [0, 3]])  # one text: no padding
    raw = json.loads((tmp_path / "a.json").read_text())
    assert raw["text"] == text.text
    assert raw["tokens"][0] == "<s>" and raw["tokens"][-1] == "</s>"
    assert np.shape(raw["attention_matrices"]) == (1, 2, len(raw["tokens"]), len(raw["tokens"]))
    assert raw["layers"] == [1] and raw["heads"] == [0, 3]


def test_float16_storage_is_decoded_to_float32_within_half_precision(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("distilbert")
    with run(model_dir, tmp_path / "a.h5", dtype="float16", schema_version=2) as f:  # read below by v2 path
        item = f["long"]
        assert item.attention.dtype == np.float32
        np.testing.assert_allclose(item.attention, expected_attention(model_dir, TEXTS[1].text), atol=5e-4)
    with h5py.File(tmp_path / "a.h5") as raw:
        assert raw["texts/00000001/attention"].dtype == np.float16


def test_same_inputs_give_byte_identical_files(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("bert")
    run(model_dir, tmp_path / "a.h5").close()
    run(model_dir, tmp_path / "b.h5").close()
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()


def random_item(rng, text_id: str, n: int, layers: int = 2, heads: int = 3) -> store.TextAttention:
    logits = rng.normal(size=(layers, heads, n, n)).astype(np.float32)
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return store.TextAttention(
        id=text_id, text=f"text ü {text_id} </script>", tokens=tuple(f"t{i}" for i in range(n)),
        token_ids=rng.integers(0, 1000, n), special_tokens_mask=rng.random(n) < 0.3,
        offsets=rng.integers(0, 50, (n, 2)), word_ids=rng.integers(-1, 10, n),
        truncated=bool(n % 2), num_tokens_untruncated=n + 3, attention=probs.astype(np.float32),
    )


PROVENANCE = store.Provenance(
    model="/m", model_type="bert", weights_sha256="ab", weight_files=("model.safetensors",),
    num_layers=6, num_heads=12, layers=(0, 5), heads=(1, 2, 3), dtype="float32",
    compute_dtype="float32", method="manual", max_length=512, trust_remote_code=False,
    library_versions={"torch": "x"}, parity_max_abs_diff=1.5e-7,
)


def test_writer_and_reader_are_exact_inverses(tmp_path):
    rng = np.random.default_rng(0)
    items = [random_item(rng, f"id-{i}", n) for i, n in enumerate([5, 1, 9])]
    with store.H5Writer(tmp_path / "a.h5", num_texts=3, dtype="float32") as writer:
        for index in (2, 0, 1):  # any writing order: stored by the user's index
            writer.write(index, items[index])
        writer.finish(PROVENANCE)
    store.write_json(tmp_path / "a.json", items[0], PROVENANCE)
    for path, expected in ((tmp_path / "a.h5", items), (tmp_path / "a.json", items[:1])):
        with store.open_attention(path) as f:
            assert f.meta == PROVENANCE
            for want, got in zip(expected, f, strict=True):
                for field in ("token_ids", "special_tokens_mask", "offsets", "word_ids", "attention"):
                    np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
                assert (got.id, got.text, got.tokens, got.truncated, got.num_tokens_untruncated) == (
                    want.id, want.text, want.tokens, want.truncated, want.num_tokens_untruncated)


def test_failed_write_leaves_no_file(tmp_path):
    item = store.TextAttention(
        id="x", text="x", tokens=("a",), token_ids=np.zeros(1, dtype=np.int64),
        special_tokens_mask=np.zeros(1, dtype=bool), offsets=np.zeros((1, 2), dtype=np.int64),
        word_ids=np.zeros(1, dtype=np.int64), truncated=False, num_tokens_untruncated=1,
        attention=np.ones((1, 1, 1, 1), dtype=np.float32),
    )
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="never written"):
        with store.H5Writer(target, num_texts=2, dtype="float32") as writer:
            writer.write(0, item)
            writer.finish(None)  # text 1 missing: refused before anything is renamed
    assert list(tmp_path.iterdir()) == []


def test_reader_refuses_foreign_and_future_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = [1, 2, 3]
    with pytest.raises(AttnpipeError, match="not an attnpipe attention file"):
        store.open_attention(foreign)
    future = tmp_path / "future.json"
    future.write_text(json.dumps({"tokens": [], "text": "", "attention_matrices": [],
                                  "metadata": {"schema_version": 99}}))
    with pytest.raises(AttnpipeError, match="schema version 99"):
        store.open_attention(future)


def test_reader_accepts_a_file_from_seed_001s_tool(tmp_path):
    path = tmp_path / "seed.json"
    attention = np.full((2, 3, 2, 2), 0.5).tolist()
    path.write_text(json.dumps({"tokens": ["[CLS]", "[SEP]"], "text": "", "attention_matrices": attention}))
    with store.open_attention(path) as f:
        assert f.meta.num_layers == 2 and f.meta.num_heads == 3
        assert f[0].attention.shape == (2, 3, 2, 2)


def test_read_whole_inflates_like_hdf5(tmp_path, monkeypatch):
    """store.read_whole inflates deflate(+shuffle) chunks itself; every other layout, a chunk
    stored with a filter skipped, and a damaged chunk go through h5py, which must agree or fail."""
    rng = np.random.default_rng(0)
    probs = rng.random((3, 4, 7, 7)).astype(np.float32)
    layouts = {  # name -> (values, create_dataset options)
        "float16 gzip+shuffle, one chunk": (probs.astype(np.float16), dict(chunks=(3, 4, 7, 7), compression="gzip", shuffle=True)),
        "float16, chunk per layer": (probs.astype(np.float16), dict(chunks=(1, 4, 7, 7), compression="gzip", shuffle=True)),
        "float32, edge chunks": (probs, dict(chunks=(2, 3, 7, 7), compression="gzip", shuffle=True)),
        "uint8 gzip": ((probs * 255).round().astype(np.uint8), dict(chunks=(1, 2, 7, 7), compression="gzip")),
        "lzf": (probs.astype(np.float16), dict(chunks=(1, 4, 7, 7), compression="lzf", shuffle=True)),
        "no filters": (probs.astype(np.float16), dict(chunks=(1, 4, 7, 7))),
        "contiguous": (probs.astype(np.float16), {}),
    }
    path = tmp_path / "layouts.h5"
    with h5py.File(path, "w") as f:
        for name, (values, options) in layouts.items():
            f.create_dataset(name, data=values, **options)
        skipped = f.create_dataset("shuffle skipped", shape=(1, 1, 2, 2), dtype=np.float16, chunks=(1, 1, 2, 2),
                                   compression="gzip", shuffle=True)
        raw = np.arange(4, dtype=np.float16).reshape(1, 1, 2, 2)
        skipped.id.write_direct_chunk((0, 0, 0, 0), store.deflate_bytes(raw.tobytes(), 1), filter_mask=1)
        broken = f.create_dataset("broken", shape=(1, 1, 2, 2), dtype=np.float16, chunks=(1, 1, 2, 2),
                                  compression="gzip", shuffle=True)
        broken.id.write_direct_chunk((0, 0, 0, 0), b"not a zlib stream")
    read_by_h5py = []
    h5py_read = h5py.Dataset.__getitem__
    monkeypatch.setattr(h5py.Dataset, "__getitem__",
                        lambda self, key: read_by_h5py.append(self.name) or h5py_read(self, key))
    with h5py.File(path, "r") as f:
        for name, (values, _) in layouts.items():
            got = store.read_whole(f[name])
            np.testing.assert_array_equal(got, values, err_msg=name)
            assert got.dtype == values.dtype and got.flags.writeable, name
        np.testing.assert_array_equal(store.read_whole(f["shuffle skipped"]), raw)
        with pytest.raises(OSError):
            store.read_whole(f["broken"])
    # The deflate layouts were inflated by read_whole itself; the rest and the odd chunks by h5py.
    assert read_by_h5py == ["/lzf", "/no filters", "/contiguous", "/shuffle skipped", "/broken"]


def test_a_gradient_that_does_not_fit_its_attention_is_never_written(tmp_path):
    """The writers refuse an --explain item whose attention_grad has another shape than its
    attention (a padded gradient once reached a file this way and was refused only on read)."""
    import dataclasses

    from attnpipe.errors import AttnpipeError

    item = random_item(np.random.default_rng(0), "a", 4)  # attention (2, 3, 4, 4)
    bad = dataclasses.replace(item, attention_grad=np.zeros((2, 3, 6, 6), dtype=np.float32))
    with pytest.raises(AttnpipeError, match=r"attention_grad of shape \(2, 3, 6, 6\); expected \(2, 3, 4, 4\)"):
        with store.H5Writer(tmp_path / "bad.h5", 1, "float32") as writer:
            writer.write(0, bad)
    with pytest.raises(AttnpipeError, match="attention_grad of shape"):
        store.write_json(tmp_path / "bad.json", bad, PROVENANCE)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("ids", [
    ["a", "", "ünïcødé", "東京", "x" * 300, "🎉", "a"],  # lengths that change at every id: one join
    # runs of one byte length (ids of most corpora): one broadcast copy per run
    [f"doc-{i:03d}" for i in range(40)] + [""] * 20 + ["東京"] * 10 + ["ab東"] * 10 + ["🎉"] * 30,
    [],
], ids=["mixed", "runs", "none"])
@pytest.mark.parametrize("beforehand", [False, True])
def test_metrics_table_columns_are_those_of_the_plain_construction(ids, beforehand):
    """metrics_table builds its columns directly (ids repeated as Arrow bytes, labels tiled), or
    takes them from metrics_labels built beforehand: the same rows and dtypes as converting every
    row's labels, for ids of any length and script."""
    import pandas as pd

    layers, heads, names = (3, 7), (0, 2, 5), ["entropy", "self"]
    values = np.random.default_rng(0).random((len(ids), 2, 3, 2))
    labels = store.metrics_labels(ids, layers, heads, names) if beforehand else None
    table = store.metrics_table(ids, layers, heads, names, values.copy(), labels=labels)
    rows = [(t, layer, head, name, values[i, a, b, c]) for i, t in enumerate(ids) for a, layer in enumerate(layers)
            for b, head in enumerate(heads) for c, name in enumerate(names)]
    plain = pd.DataFrame(rows, columns=["text_id", "layer", "head", "metric", "value"])
    plain["metric"] = pd.Categorical(plain["metric"], categories=names)
    if not ids:  # no rows: the plain construction cannot know the columns' dtypes
        plain = plain.astype({"text_id": table.dtypes["text_id"], "layer": np.int64, "head": np.int64,
                              "value": np.float64})
    assert list(table.dtypes) == list(plain.dtypes)
    pd.testing.assert_frame_equal(table, plain)
    with pytest.raises(ValueError, match="labelled rows"):  # labels of other texts
        store.metrics_table(ids + ["extra"], layers, heads, names, np.zeros((len(ids) + 1, 2, 3, 2)),
                            labels=store.metrics_labels(ids, layers, heads, names))
