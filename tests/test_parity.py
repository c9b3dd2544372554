"""The specification: our forward pass against transformers' eager attention on the same weights.

Per head, on real (unpadded) positions: probabilities within 1e-5, last hidden state within 1e-4,
every row summing to 1, padded keys exactly 0.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from attnpipe.extract.loading import load_model
from attnpipe.models import CAUSAL_MODEL_TYPES, is_seq2seq, supported_model_types

CAUSAL = {"gpt2", "llama", "mistral", "qwen2"}
WINDOWED = {"mistral", "qwen2"}
ATTN_TOL = 1e-5
HIDDEN_TOL = 1e-4

TINY_TEXTS = [
    "the cat sat on the mat .",
    "a dog ran fast and the red cat was small !",
    "it",
    "big blue mat , small red dog ? the cat is slow and it ran on the mat",
    "w30 w31 w40 the",
]

MINILM_TEXTS = [
    "The cat sat on the mat.",
    "Hello, world!!! What's going on?!",
    "In 2024, the company's revenue rose 12.5% to $3.4 billion (up from $3.0bn).",
    "Naïve café owners in Zürich serve crème brûlée.",
    "東京は日本の首都です。",
    "Ελληνικά γράμματα: α, β, γ.",
    "Emoji test: 🎉🚀 are fun 😀",
    "e = mc^2; x_1 + x_2 = 3.14159",
    "She said, \"I don't know,\" and left — quickly.",
    "http://example.com/path?query=1&b=2 is a URL.",
    "The trophy didn't fit in the suitcase because it was too big.",
    "The old man the boat.",
    "1 2 3 4 5 6 7 8 9 10",
    "A",
    "...",
    "Well-known, state-of-the-art, long-term results; semi-colons: colons, and (parentheses).",
    "def f(x): return x ** 2  # a comment",
    "José and Zoë met in São Paulo on 3/14/2015 at 9:26 a.m.",
    "UPPER CASE TEXT SHOULD BE LOWERED BY AN UNCASED TOKENIZER",
    "Tab\tseparated\tvalues and  double  spaces.",
    "Supercalifragilisticexpialidocious antidisestablishmentarianism.",
    # longer than max_length below: truncated, as the pipeline does
    " ".join(["The quick brown fox jumps over the lazy dog."] * 12),
]


def compare_with_eager(model_dir, texts, max_length=None):
    """Run one padded batch through both passes; return (attention diff, hidden diff, ours, mask)."""
    model = load_model(model_dir, torch.device("cpu"))
    batch = model.tokenizer(
        texts, padding=True, truncation=max_length is not None, max_length=max_length, return_tensors="pt"
    )
    if model.weights.token_type is None:
        batch.pop("token_type_ids", None)
    mask = batch["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 2, "texts of different lengths must exercise padding"
    with torch.inference_mode():
        ours = model.family.forward(model.weights, dict(batch))
        ref = model.hf_model(**batch, output_attentions=True)
    assert set(ours.attentions) == {"self"}
    ours = dataclasses.replace(ours, attentions=ours.attentions["self"])  # layer -> (B, H, Q, K)
    assert len(ref.attentions) == model.num_layers > 0, "reference returned no attentions"
    attn_diff = hidden_diff = 0.0
    for row, n in enumerate(mask.sum(1).tolist()):
        for layer in range(model.num_layers):
            mine = ours.attentions[layer][row, :, :n, :n]  # (H, Q, K) on real tokens
            theirs = ref.attentions[layer][row, :, :n, :n]
            attn_diff = max(attn_diff, (mine - theirs).abs().max().item())
            torch.testing.assert_close(mine.sum(-1), torch.ones_like(mine[..., 0]), rtol=0, atol=1e-5)
            assert torch.all(ours.attentions[layer][row, :, :n, n:] == 0), "padded keys must get 0"
        hidden_diff = max(
            hidden_diff, (ours.hidden[row, :n] - ref.last_hidden_state[row, :n]).abs().max().item()
        )
    return attn_diff, hidden_diff, ours, mask


@pytest.mark.parametrize(  # encoder-decoders: tests/test_parity_seq2seq.py
    "model_type", [t for t in supported_model_types() if not is_seq2seq(t)])
def test_tiny_family_matches_transformers_eager(tiny_model_dir, model_type):
    attn_diff, hidden_diff, ours, mask = compare_with_eager(tiny_model_dir(model_type), TINY_TEXTS)
    assert attn_diff <= ATTN_TOL
    assert hidden_diff <= HIDDEN_TOL
    windows = [getattr(layer, "window", None) for layer in load_model(tiny_model_dir(model_type), torch.device("cpu")).weights.layers]
    assert (model_type in WINDOWED) == any(w is not None for w in windows)
    for row, n in enumerate(mask.sum(1).tolist()):  # real query rows only
        ones = torch.ones(n, n, dtype=torch.bool)
        for index, probs in ours.attentions.items():
            if model_type in CAUSAL:  # future keys exactly 0
                assert torch.all(probs[row, :, :n, :n][:, torch.triu(ones, diagonal=1)] == 0)
            if windows[index] is not None:  # keys at or beyond the window exactly 0
                assert torch.all(probs[row, :, :n, :n][:, torch.tril(ones, diagonal=-windows[index])] == 0)
    # Non-uniform attention, so the comparison above could have caught a wrong scale or mask.
    longest = int(mask.sum(1).argmax())
    assert ours.attentions[0][longest].max().item() > 3 / mask.shape[1]


def test_causal_model_types_come_from_the_families():
    assert CAUSAL_MODEL_TYPES == CAUSAL  # derived from each family's CAUSAL constant


@pytest.mark.slow
def test_packaged_minilm_matches_transformers_eager(minilm_dir):
    assert len(MINILM_TEXTS) >= 20
    attn_diff, hidden_diff, ours, mask = compare_with_eager(minilm_dir, MINILM_TEXTS, max_length=64)
    assert mask.sum(1).max() == 64, "the long text must reach --max-length and be truncated"
    assert len(ours.attentions) == 6 and ours.attentions[0].shape[1] == 12
    assert attn_diff <= ATTN_TOL
    assert hidden_diff <= HIDDEN_TOL


def test_albert_layers_share_weights(tiny_model_dir):
    model = load_model(tiny_model_dir("albert"), torch.device("cpu"))
    assert model.num_layers == 3
    assert model.weights.layers[0] is model.weights.layers[2]


def test_verify_stops_a_run_whose_pass_drifts(tiny_model_dir, tmp_path, monkeypatch):
    """--verify must notice a wrong forward pass, name where, and leave no output file."""
    from attnpipe.extract import runner as extraction
    from attnpipe.extract.corpus import Text
    from attnpipe.errors import AttnpipeError
    from attnpipe.models import bert

    real = bert.attention_probs
    monkeypatch.setattr(bert, "attention_probs", lambda q, k, scale, mask=None: real(q, k, scale * 1.05, mask))
    output = tmp_path / "out.h5"
    config = extraction.ExtractConfig(
        texts=(Text("a", "the cat sat on the mat"), Text("b", "a dog")), output=output,
        model_dir=tiny_model_dir("bert"), verify=True, progress=False,
    )
    with pytest.raises(AttnpipeError, match=r"--verify failed: text '[ab]' layer \d head \d differs"):
        extraction.extract(config)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("model_type", [t for t in supported_model_types() if not is_seq2seq(t)])
def test_attention_only_pass_is_the_full_pass_to_the_bit(tiny_model_dir, model_type, monkeypatch):
    """forward(hidden=False), what a plain extraction runs, stops after the last kept layer's
    attention; every kept layer is bit-identical to the full pass's, and no later layer runs."""
    model = load_model(tiny_model_dir(model_type), torch.device("cpu"))
    batch = dict(model.tokenizer(TINY_TEXTS, padding=True, return_tensors="pt"))
    if getattr(model.weights, "token_type", 1) is None:
        batch.pop("token_type_ids", None)
    last = model.num_layers - 1
    with torch.inference_mode():
        full = model.family.forward(model.weights, batch)
        for keep in ({0}, set(range(model.num_layers)), {last}):
            layers = frozenset(keep)
            short = model.family.forward(model.weights, batch, keep_layers={"self": layers}, hidden=False)
            assert short.hidden is None
            assert sorted(short.attentions["self"]) == sorted(layers)
            for index in layers:
                assert torch.equal(short.attentions["self"][index], full.attentions["self"][index])
    # Stopping at layer 0 runs its query and key projections only: fewer linear layers than in full.
    calls = []
    original = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.inference_mode():
        model.family.forward(model.weights, batch, keep_layers={"self": frozenset({0})}, hidden=False)
        stopped = len(calls)
        calls.clear()
        model.family.forward(model.weights, batch, keep_layers={"self": frozenset({0})})
    assert 0 < stopped < len(calls)
