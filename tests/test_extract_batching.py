"""The runner's batch-wide shortcuts (issue 22) equal what they replaced, text by text.

- `sinks.stored_values`: a layer's stored values of a whole batch, copied run by run of equal
  lengths, equal each text's crop (heads x stored query rows x real keys) laid end to end, and
  converted as `store.to_storage` converts;
- `batching.pad` / `mask` equal the nested-list tensors they replaced;
- texts tokenized once, window by window (`inputs.text_windows`): a corpus run in many windows
  stores every text exactly as in one window (only the slot order differs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attnpipe import store
from attnpipe.extract import inputs
from attnpipe.extract.batching import mask, pad
from attnpipe.extract.corpus import Text
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.extract.sinks import equal_runs, stored_values


@pytest.mark.parametrize("dtype", ["float32", "float16", "uint8"])
@pytest.mark.parametrize("rows", ["all", "cls", "last"])
def test_a_batch_copied_run_by_run_equals_each_texts_crop(rows, dtype):
    rng = np.random.default_rng(0)
    for _ in range(200):
        b, h = int(rng.integers(1, 9)), int(rng.integers(1, 5))
        lengths = rng.integers(1, 12, b).tolist()
        if rng.random() < 0.7:  # length-sorted, as the runner's batches are (runs of equal lengths)
            lengths.sort(reverse=True)
        t = max(lengths) + int(rng.integers(0, 3))  # padding beyond the longest text, too
        probs = torch.softmax(torch.randn(b, h, t, t) * 3, dim=-1)
        got = stored_values(probs, equal_runs(lengths), rows, dtype)
        crops = [probs[row][:, store.query_positions(rows, n), :n].numpy() for row, n in enumerate(lengths)]
        expected = np.concatenate([store.to_storage(crop, dtype).reshape(-1) for crop in crops])
        assert got.dtype == expected.dtype and np.array_equal(got, expected)


def test_equal_runs():
    assert equal_runs([5, 5, 3, 3, 3, 1, 5]) == [(0, 2, 5), (2, 5, 3), (5, 6, 1), (6, 7, 5)]
    assert equal_runs([4]) == [(0, 1, 4)]


def test_pad_and_mask_equal_nested_list_tensors():
    rng = np.random.default_rng(1)
    for _ in range(100):
        rows = [rng.integers(0, 30000, int(rng.integers(1, 20))).tolist() for _ in range(int(rng.integers(1, 8)))]
        width = max(len(r) for r in rows)
        expected = torch.tensor([r + [7] * (width - len(r)) for r in rows])
        got = pad(rows, 7, torch.device("cpu"))
        assert got.dtype == expected.dtype and torch.equal(got, expected)
        lengths = [len(r) for r in rows]
        assert torch.equal(mask(lengths, torch.device("cpu")), torch.tensor([[1] * n + [0] * (width - n)
                                                                            for n in lengths]))


def test_windows_cover_every_text_once_within_their_limits(monkeypatch):
    monkeypatch.setattr(inputs, "WINDOW_TEXTS", 4)
    monkeypatch.setattr(inputs, "WINDOW_CHARS", 50)
    texts = [Text(str(i), "x" * n) for i, n in enumerate([10, 10, 10, 10, 10, 60, 5, 30, 30, 1])]
    windows = list(inputs.text_windows(texts))
    assert [i for w in windows for i in w] == list(range(len(texts)))
    for w in windows:
        assert len(w) <= 4
        assert len(w) == 1 or sum(len(texts[i].text) for i in w) <= 50  # a longer text goes alone
    assert list(inputs.text_windows([])) == []


def test_one_ahead_makes_each_window_once_in_order_and_raises_where_it_failed():
    import threading

    made = []

    def make(k):
        made.append((k, threading.current_thread().name))
        if k == 3:
            raise ValueError("window 3")
        return k * 10

    got = []
    with pytest.raises(ValueError, match="window 3"):
        for value in inputs.one_ahead(make, 5):
            got.append(value)
    assert got == [0, 10, 20]  # windows before the failing one are all handed out first
    assert [k for k, _ in made] == [0, 1, 2, 3] and all(name.startswith("attnpipe-tokenize") for _, name in made)
    made.clear()
    stream = inputs.one_ahead(make, 3)
    assert next(stream) == 0
    stream.close()  # a run that stops early: at most the window being made is made
    assert [k for k, _ in made] in ([0], [0, 1])
    assert list(inputs.one_ahead(make, 3)) == [0, 10, 20]


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_many_windows_store_every_text_as_one_window(tiny_model_dir, tmp_path, monkeypatch, dtype):
    texts = tuple(Text(f"t{i}", " ".join(["the big cat sat on the mat"] * (1 + i % 5))[: 5 + 7 * i])
                  for i in range(23))
    config = ExtractConfig(texts=texts, model_dir=tiny_model_dir("bert"), progress=False, dtype=dtype, batch_size=4)
    one = extract(dataclasses.replace(config, output=tmp_path / "one.h5"))
    monkeypatch.setattr(inputs, "WINDOW_TEXTS", 5)
    many = extract(dataclasses.replace(config, output=tmp_path / "many.h5"))
    assert one.num_tokens == many.num_tokens and one.truncated_ids == many.truncated_ids
    with store.open_attention(tmp_path / "one.h5") as a, store.open_attention(tmp_path / "many.h5") as b:
        assert list(a.ids) == list(b.ids) == [t.id for t in texts]
        for i in range(len(texts)):
            x, y = a[i], b[i]
            for field in dataclasses.fields(x):
                u, v = getattr(x, field.name), getattr(y, field.name)
                if field.name == "attention":  # float32 rounding follows the batch's shape: a logit's
                    # rounding error moves p by p times it, so relative (2.7e-6 at p = 0.29, 1.2e-5
                    # relative, on one machine; 1.2e-6 on another); it may move a float16 value by one
                    # unit in the last place (2^-11 relative)
                    np.testing.assert_allclose(u, v, rtol=5e-5 if dtype == "float32" else 2**-10, atol=2e-6)
                elif isinstance(u, np.ndarray):
                    assert np.array_equal(u, v), field.name
                else:
                    assert u == v, field.name
