"""--explain on encoder-decoder pairs: every kind's gradients reach the file and read back.

A tiny T5 and BART with their LM heads run `extract_attention.py --explain next-token` on
source/target pairs, to .h5 (several pairs) and .json (one). What is read back must equal
attnpipe.extract.gradients.text_gradients on the same input (the stored token ids), restricted
to the stored layers and heads for the attention gradients, every head for the head scores.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import extract_attention
from attnpipe.errors import run_cli
from attnpipe.extract import gradients as G
from attnpipe.extract.loading import load_model
from attnpipe.store import open_attention
from seq2seq_tiny import save_tiny_seq2seq

PAIRS = [
    {"id": "one", "source": "the cat sat on the mat", "target": "a dog ran fast"},
    {"id": "two", "source": "big blue mat , small red dog ?", "target": "it was slow !"},
]
KINDS = ("decoder", "cross")
# The file holds float32 copies of what the same float32 code computes here: at most rounding apart.
RTOL, ATOL = 1e-5, 1e-7


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    cache = {}

    def make(variant: str):
        if variant not in cache:
            cache[variant] = save_tiny_seq2seq(variant, tmp_path_factory.mktemp(variant), lm_head=True)
        return cache[variant]

    return make


def extract(capsys, *argv) -> None:
    capsys.readouterr()
    code = run_cli(extract_attention.main, [str(a) for a in argv])
    assert code == 0, capsys.readouterr().err


def expected_gradients(model, objective, item) -> G.TextGradients:
    """text_gradients on the pair as stored: source ids, decoder input ids (start + shifted target)."""
    src = torch.tensor(item.token_ids)[None]
    dec = torch.tensor(item.target.token_ids)[None]
    batch = {"input_ids": src, "attention_mask": torch.ones_like(src),
             "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}
    return G.text_gradients(model, objective, batch, ablate=True)


def close(actual, expected) -> None:
    expected = np.asarray(expected, dtype=np.float32)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL * max(1.0, float(np.abs(expected).max())))


def check_item(item, meta, model, objective) -> None:
    result = expected_gradients(model, objective, item)
    target = item.target
    s, t = item.num_tokens, target.num_tokens
    decoder_sel = np.ix_(meta.decoder_layers, meta.decoder_heads)
    decoder_heads = (meta.decoder_num_layers, meta.decoder_num_heads)
    # The encoder's, as before.
    close(item.attention_grad, result.attention_grad["self"][np.ix_(meta.layers, meta.heads)])
    close(item.head_gate_grad, result.head_gate_grad["self"])
    close(item.head_ablation, result.head_ablation["self"])
    assert item.gradient_target_label == result.target_label
    # The decoder's and the cross-attention's: shapes follow the stored decoder selection.
    assert target.decoder_attention_grad.shape == target.decoder_attention.shape == (
        len(meta.decoder_layers), len(meta.decoder_heads), t, t)
    assert target.cross_attention_grad.shape == target.cross_attention.shape == (
        len(meta.decoder_layers), len(meta.decoder_heads), t, s)
    for kind in KINDS:
        close(getattr(target, f"{kind}_attention_grad"), result.attention_grad[kind][decoder_sel])
        for score, values in (("head_gate_grad", result.head_gate_grad), ("head_ablation", result.head_ablation)):
            stored = getattr(target, f"{kind}_{score}")
            assert stored.shape == decoder_heads
            close(stored, values[kind])
        np.testing.assert_array_equal(getattr(target, f"{kind}_head_importance"),
                                      np.abs(getattr(target, f"{kind}_head_gate_grad")))
    # next-token reads the decoder: its gradients are not all zero.
    assert np.abs(target.decoder_head_gate_grad).max() > 0 and np.abs(target.cross_attention_grad).max() > 0


@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_pairs_explained_to_h5_and_json_store_every_kind(variant, lm_dir, tmp_path, capsys):
    model_dir = lm_dir(variant)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS), encoding="utf-8")
    h5_out, json_out = tmp_path / "pairs.h5", tmp_path / "one.json"
    # A selection in both stacks: the last layer of each, heads 0 and 1 (BART's decoder has 2 heads).
    selection = ("--layer", "-1", "--heads", "0,1")
    extract(capsys, "--model_dir", model_dir, "--texts-file", pairs, *selection,
            "--explain", "next-token", "--ablate", "-o", h5_out, "-q")
    extract(capsys, "--model_dir", model_dir, "--source", PAIRS[0]["source"], "--target", PAIRS[0]["target"],
            *selection, "--explain", "next-token", "--ablate", "-o", json_out, "-q")

    model = load_model(model_dir, torch.device("cpu"))
    objective = G.build_objective(model, G.parse_target("next-token"))
    with open_attention(h5_out) as f:
        meta = f.meta
        assert meta.gradient_target == "next-token" and meta.schema_version == 3
        assert meta.decoder_layers == (meta.decoder_num_layers - 1,) and meta.decoder_heads == (0, 1)
        items = list(f)
        for item in items:
            check_item(item, meta, model, objective)
        for kind in KINDS:  # corpus means of the decoder side, like head_importance_mean
            close(f.corpus_array(f"{kind}_head_importance_mean"),
                  np.mean([getattr(i.target, f"{kind}_head_importance") for i in items], axis=0))
            close(f.corpus_array(f"{kind}_head_ablation_mean"),
                  np.mean([getattr(i.target, f"{kind}_head_ablation") for i in items], axis=0))
    with open_attention(json_out) as f:
        (item,) = list(f)
        check_item(item, f.meta, model, objective)
    payload = json.loads(json_out.read_text(encoding="utf-8"))
    for kind in KINDS:
        for key in ("attention_grad", "head_gate_grad", "head_importance", "head_ablation"):
            assert f"{kind}_{key}" in payload


def test_pairs_without_explain_have_no_decoder_gradients(lm_dir, tmp_path, capsys):
    out = tmp_path / "plain.json"
    extract(capsys, "--model_dir", lm_dir("t5"), "--source", "the cat", "--target", "a dog", "-o", out, "-q")
    payload = json.loads(out.read_text(encoding="utf-8"))
    assert not any(key.endswith(("_grad", "_importance", "_ablation")) for key in payload)
    with open_attention(out) as f:
        target = f[0].target
        assert target.decoder_attention_grad is None and target.cross_head_gate_grad is None
        assert target.decoder_head_importance is None and f[0].attention_grad is None
