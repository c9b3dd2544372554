"""Checkpoint comparison on files built with the store's writer: a head that changes is found,
unchanged heads give 0, and files with different texts or tokens are refused."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from attnpipe import store
from attnpipe.analyze.compare import checkpoint_distances, metrics_by_checkpoint
from attnpipe.errors import AttnpipeError
from test_analyze_cli import PROVENANCE, item


def write(path: Path, items) -> store.AttentionFile:
    with store.H5Writer(path, num_texts=len(items), dtype="float32") as writer:
        for index, it in enumerate(items):
            writer.write(index, it)
        writer.finish(PROVENANCE)
    return store.open_attention(path)


def with_uniform_head(it: store.TextAttention, layer: int, head: int) -> store.TextAttention:
    attention = it.attention.copy()
    attention[layer, head] = 1.0 / it.num_tokens
    return dataclasses.replace(it, attention=attention)


def test_changed_head_is_found(tmp_path):
    rng = np.random.default_rng(0)
    base = [item(rng, f"t{i}", n) for i, n in enumerate((4, 7))]
    changed = [with_uniform_head(it, 1, 2) for it in base]  # stored position (1, 2) = model (4, 7)
    files = [write(tmp_path / "a.h5", base), write(tmp_path / "b.h5", base), write(tmp_path / "c.h5", changed)]
    table = checkpoint_distances(files)
    assert list(table.checkpoint.unique()) == [1, 2]
    assert len(table) == 2 * 2 * 3
    assert np.allclose(table[table.checkpoint == 1].js_to_previous, 0, atol=1e-6)
    last = table[table.checkpoint == 2].set_index(["layer", "head"])
    assert last.loc[(4, 7), "js_to_previous"] > 0.1
    assert np.allclose(last.drop(index=(4, 7)).js_to_previous, 0, atol=1e-6)
    np.testing.assert_allclose(last.js_to_first, last.js_to_previous)  # b equals a
    by_metric = metrics_by_checkpoint(files, metrics=["entropy"], resamples=10)
    entropy = by_metric.set_index(["checkpoint", "layer", "head"])["mean"]
    assert entropy[(2, 4, 7)] > entropy[(0, 4, 7)]  # uniform has the largest entropy
    assert entropy[(1, 3, 1)] == pytest.approx(entropy[(0, 3, 1)])
    for f in files:
        f.close()


def test_different_texts_or_tokens_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    base = [item(rng, f"t{i}", n) for i, n in enumerate((4, 5))]
    a = write(tmp_path / "a.h5", base)
    other_ids = write(tmp_path / "b.h5", [dataclasses.replace(base[0], id="zz"), base[1]])
    with pytest.raises(AttnpipeError, match="different texts.*'t0'"):
        checkpoint_distances([a, other_ids])
    retokenized = write(tmp_path / "c.h5", [dataclasses.replace(base[0], tokens=("x",) * 4), base[1]])
    with pytest.raises(AttnpipeError, match="tokenized differently"):
        checkpoint_distances([a, retokenized])
    with pytest.raises(AttnpipeError, match="at least two"):
        checkpoint_distances([a])
