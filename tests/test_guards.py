"""Runtime guards: a forward pass that breaks the attention contract stops the run, naming where.

Each test breaks one family's pass by monkeypatching the function it calls (like
test_parity.py's --verify test), runs the real extraction and expects one clear error and no file.
"""

from __future__ import annotations

import pytest
import torch

from attnpipe.extract import runner as extraction
from attnpipe.extract import guards
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.models import bert, gpt2

# Different lengths, so the batch is padded and padded keys exist.
TEXTS = (Text("long-one", "the cat sat on the mat and it was red"), Text("short", "a dog"))


def run(model_dir, tmp_path) -> None:
    config = extraction.ExtractConfig(texts=TEXTS, output=tmp_path / "out.h5", model_dir=model_dir,
                                      progress=False)
    extraction.extract(config)


def expect_stop(model_dir, tmp_path, pattern: str) -> None:
    with pytest.raises(AttnpipeError, match=pattern):
        run(model_dir, tmp_path)
    assert list(tmp_path.iterdir()) == [], "a stopped run must leave nothing"


def test_intact_passes_run_clean(tiny_model_dir, tmp_path):
    for family in ("bert", "gpt2"):
        run(tiny_model_dir(family), tmp_path)
        assert (tmp_path / "out.h5").is_file()


def test_nan_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = bert.attention_probs

    def nan_in_head_2(q, k, scale, mask=None):
        probs = real(q, k, scale, mask).clone()
        probs[:, 2, 1, 0] = float("nan")
        return probs

    monkeypatch.setattr(bert, "attention_probs", nan_in_head_2)
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"NaN or infinite at text '(long-one|short)' layer 0 head 2 query 1")


def test_infinity_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = bert.attention_probs

    def inf_in_head_3(q, k, scale, mask=None):
        probs = real(q, k, scale, mask).clone()
        probs[1, 3, 0, 0] = float("inf")  # batch row 1 is the shorter text (longest first)
        return probs

    monkeypatch.setattr(bert, "attention_probs", inf_in_head_3)
    expect_stop(tiny_model_dir("bert"), tmp_path, r"NaN or infinite at text 'short' layer 0 head 3 query 0")


def test_rows_not_summing_to_one_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = bert.attention_probs
    monkeypatch.setattr(bert, "attention_probs", lambda q, k, scale, mask=None: real(q, k, scale, mask) * 1.001)
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"rows do not sum to 1 at text 'long-one' layer 0 head 0 query 0: off by up to 0\.001")


def test_padded_keys_seen_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    # No padding mask: the short text's queries spread weight onto padded keys.
    monkeypatch.setattr(bert, "padding_mask", lambda mask, dtype: torch.zeros(mask.shape[0], 1, 1, mask.shape[1]))
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"a padded key gets non-zero attention at text 'short' layer 0 head 0 query 0 key 4")


def test_future_keys_seen_stop_the_run(tiny_model_dir, tmp_path, monkeypatch):
    # GPT-2 without its causal mask: every query sees later keys.
    monkeypatch.setattr(gpt2, "causal_mask", lambda t, dtype, device, window=None: torch.zeros(1, 1, t, t))
    expect_stop(tiny_model_dir("gpt2"), tmp_path,
                r"a future key gets non-zero attention at text 'long-one' layer 0 head 0 query 0 key 1")


def test_empty_attention_stops_the_run(tiny_model_dir, tmp_path, monkeypatch):
    real = bert.forward

    def no_attention(*args, on_layer=None, **kwargs):  # neither streams nor returns any layer
        out = real(*args, **kwargs)
        return type(out)(hidden=out.hidden, attentions={})

    monkeypatch.setattr(bert, "forward", no_attention)
    expect_stop(tiny_model_dir("bert"), tmp_path, r"returned no attention for texts \['long-one', 'short'\]")


def test_guard_unit_cases():
    """The function itself, on hand-made tensors: empty batch, wrong shape, a valid causal batch."""
    probs = torch.tensor([[[[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]]])  # (1, 1, 3, 3)
    guards.check_attention({0: probs}, [3], ["t"], causal=True)
    guards.check_attention({0: probs[:, :, :2, :2].contiguous()}, [1], ["t"], causal=True)  # row 1 is padding
    with pytest.raises(AttnpipeError, match="empty attention"):
        guards.check_attention({0: torch.zeros(0, 1, 3, 3)}, [], [], causal=False)
    with pytest.raises(AttnpipeError, match="empty attention"):
        guards.check_attention({0: probs}, [0], ["t"], causal=False)
    with pytest.raises(AttnpipeError, match=r"layer 4 attention has shape \(1, 1, 3, 2\)"):
        guards.check_attention({0: probs, 4: probs[..., :2]}, [3], ["t"], causal=False)
