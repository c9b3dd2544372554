"""Encoder-decoder models through the three scripts: source/target pairs -> .h5 / .json ->
seed 003's figures -> metrics on the encoder attention; and the refusals, one line each.

Most commands run in-process through `run_cli(main, argv)` (no torch import per command); the
end-to-end test at the bottom runs the scripts as subprocesses, as a user types them.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import run_cli
from attnpipe.store import open_attention
from conftest import run_script
from seq2seq_tiny import save_tiny_seq2seq

PAIRS = [
    {"id": "short", "source": "it ran", "target": "the cat is big and the dog is small ."},
    {"id": "long", "source": "the cat sat on the mat and the red dog ran fast", "target": "a cat"},
    {"id": "mid", "source": "big blue mat , small red dog ?", "target": "it was slow !"},
]
SEED003 = ("cross_attention_layer{N}.png", "cross_attention_multihead_layer{N}.png", "self_attention_layer{N}.png")


@pytest.fixture(scope="module")
def seq2seq_dir(tmp_path_factory):
    cache = {}

    def make(variant: str):
        if variant not in cache:
            cache[variant] = save_tiny_seq2seq(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return make


@pytest.fixture
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS), encoding="utf-8")
    return path


def ok(capsys, main, *argv) -> str:
    capsys.readouterr()
    code = run_cli(main, [str(a) for a in argv])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.err


def refused(capsys, main, needles, *argv) -> str:
    capsys.readouterr()
    code = run_cli(main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.parametrize("variant", ["t5", "bart", "marian"])
def test_pairs_file_to_h5_verified_with_both_sides(variant, seq2seq_dir, pairs_file, tmp_path, capsys):
    model_dir = seq2seq_dir(variant)
    out = tmp_path / "pairs.h5"
    err = ok(capsys, extract_attention.main, "--model_dir", model_dir, "--texts-file", pairs_file,
             "-o", out, "--verify", "-q")
    assert err == ""
    tokenizer_config = json.loads((model_dir / "config.json").read_text())
    start = tokenizer_config["decoder_start_token_id"]
    with open_attention(out) as f:
        meta = f.meta
        assert f.ids == ("short", "long", "mid") and meta.schema_version == 3 and meta.is_seq2seq
        assert meta.parity_max_abs_diff <= 1e-5 and meta.parity_hidden_max_abs_diff <= 1e-4
        assert (meta.num_layers, meta.decoder_num_layers) == (2, 3)
        assert meta.decoder_layers == (0, 1, 2)
        for pair, item in zip(PAIRS, f):
            target = item.target
            s, t = item.num_tokens, target.num_tokens
            assert item.text == pair["source"] and target.text == pair["target"]
            assert item.tokens[-1] == target.labels[-1] == "</s>"
            # Teacher forcing: decoder input = start token + labels shifted right by one.
            assert target.token_ids[0] == start and target.special_tokens_mask[0]
            np.testing.assert_array_equal(target.token_ids[1:], target.label_ids[:-1])
            assert target.labels[:-1] == tuple(pair["target"].split()) or variant == "bart"
            assert item.attention.shape == (2, 4, s, s)
            heads = len(meta.decoder_heads)
            assert target.decoder_attention.shape == (3, heads, t, t)
            assert target.cross_attention.shape == (3, heads, t, s)
            future = np.triu(np.ones((t, t), dtype=bool), k=1)
            assert np.all(target.decoder_attention[:, :, future] == 0)
            for probs in (item.attention, target.decoder_attention, target.cross_attention):
                np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_json_pair_matches_h5_and_selects_layers_in_both_stacks(seq2seq_dir, tmp_path, capsys):
    model_dir = seq2seq_dir("marian")
    pair = PAIRS[0]
    h5, js = tmp_path / "a.h5", tmp_path / "a.json"
    for out in (h5, js):
        ok(capsys, extract_attention.main, "--model_dir", model_dir, "--source", pair["source"],
           "--target", pair["target"], "--layer", "-1", "--heads", "0,2", "-o", out, "-q")
    payload = json.loads(js.read_text(encoding="utf-8"))
    assert payload["decoder_layers"] == [2] and payload["layers"] == [1] and payload["decoder_heads"] == [0, 2]
    assert payload["target"]["labels"][-1] == "</s>"
    assert np.shape(payload["cross_attention_matrices"]) == (1, 2, len(payload["target"]["tokens"]),
                                                            len(payload["tokens"]))
    with open_attention(h5) as a, open_attention(js) as b:
        x, y = a[0], b[0]
        assert a.meta.decoder_layers == b.meta.decoder_layers == (2,)
        assert x.target.tokens == y.target.tokens and x.tokens == y.tokens
        for left, right in ((x.attention, y.attention), (x.target.decoder_attention, y.target.decoder_attention),
                            (x.target.cross_attention, y.target.cross_attention)):
            np.testing.assert_array_equal(left, right)


@pytest.mark.slow  # ~10 s: three extractions' worth of figures plus the metrics tables
def test_seed003_figures_and_metrics_on_the_encoder(seq2seq_dir, pairs_file, tmp_path, capsys):
    h5 = tmp_path / "pairs.h5"
    ok(capsys, extract_attention.main, "--model_dir", seq2seq_dir("bart"), "--texts-file", pairs_file,
       "-o", h5, "-q")
    figs = tmp_path / "figs"
    figs.mkdir()
    err = ok(capsys, visualize_attention.main, "--input_file", h5, "--text-id", "short", "--mode", "seq2seq",
             "--output-dir", figs)
    expected = sorted(name.format(N=2) for name in SEED003)  # the last decoder layer by default
    assert sorted(p.name for p in figs.iterdir()) == expected and err.count("wrote") == 3
    ok(capsys, visualize_attention.main, "--input_file", h5, "--mode", "seq2seq", "--layer", "0",
       "--output-dir", figs)
    assert len(list(figs.glob("*layer0.png"))) == 3

    # The figure modes on cross-attention: rows = target, columns = source.
    for mode in ("plot", "heads", "average", "layers"):
        ok(capsys, visualize_attention.main, "-i", h5, "--attention", "cross", "--mode", mode, "--layer", "-1",
           "-o", tmp_path / f"cross_{mode}.png")
    ok(capsys, visualize_attention.main, "-i", h5, "--attention", "decoder", "--mode", "prepare",
       "-o", tmp_path / "decoder.json")
    prepared = json.loads((tmp_path / "decoder.json").read_text(encoding="utf-8"))
    with open_attention(h5) as f:
        assert prepared["tokens"] == list(f[0].target.tokens)

    # Stage 2 reads `attention`, the encoder's: metrics work on seq2seq files unchanged.
    ok(capsys, analyze_attention.main, "metrics", h5, "--output-dir", tmp_path / "metrics",
       "--bootstrap", "20")
    import pandas as pd

    table = pd.read_csv(tmp_path / "metrics" / "metrics.csv")
    assert set(table["text_id"]) == {"short", "long", "mid"}
    assert set(table["layer"]) == {0, 1} and set(table["head"]) == {0, 1, 2, 3}  # encoder: 2 layers x 4 heads


def test_square_only_modes_and_non_seq2seq_files_refuse_clearly(seq2seq_dir, tiny_model_dir, tmp_path, capsys):
    h5 = tmp_path / "pair.h5"
    ok(capsys, extract_attention.main, "--model_dir", seq2seq_dir("t5"), "--source", "the cat",
       "--target", "a dog", "-o", h5, "-q")
    out = tmp_path / "x.json"  # seed 001's prepared JSON has one token list (the html page shows cross)
    refused(capsys, visualize_attention.main, ["--mode prepare", "cross-attention", "rectangular"],
            "-i", h5, "--attention", "cross", "--mode", "prepare", "-o", out)
    assert not out.exists()
    refused(capsys, visualize_attention.main, ["--output-dir"], "-i", h5, "--mode", "seq2seq",
            "-o", tmp_path / "x.png")
    bert_json = tmp_path / "bert.json"
    ok(capsys, extract_attention.main, "--model_dir", tiny_model_dir("bert"), "--text", "the cat", "-o",
       bert_json, "-q")
    refused(capsys, visualize_attention.main, ["encoder-decoder", "'bert'"], "-i", bert_json,
            "--attention", "cross", "-o", tmp_path / "x.png")
    refused(capsys, visualize_attention.main, ["encoder-decoder"], "-i", bert_json, "--mode", "seq2seq",
            "--output-dir", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert.json", "pair.h5"]


def test_extract_refusals(seq2seq_dir, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out.h5"
    t5_dir, bert_dir = seq2seq_dir("t5"), tiny_model_dir("bert")
    refused(capsys, extract_attention.main, ["--source", "2 time(s)", "--target", "1 time(s)"],
            "--model_dir", t5_dir, "--source", "a", "--source", "b", "--target", "c", "-o", out)
    refused(capsys, extract_attention.main, ["encoder-decoder", "--source"],
            "--model_dir", t5_dir, "--text", "the cat", "-o", out)
    refused(capsys, extract_attention.main, ["'bert'", "not an encoder-decoder", "t5", "bart", "marian"],
            "--model_dir", bert_dir, "--source", "a", "--target", "b", "-o", out)
    refused(capsys, extract_attention.main, ["--target number 1", "empty"],
            "--model_dir", t5_dir, "--source", "a", "--target", " ", "-o", out)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source": "the cat", "target": "a dog"}\n{"source": "it"}\n', encoding="utf-8")
    refused(capsys, extract_attention.main, ["bad.jsonl line 2", '"target"'],
            "--model_dir", t5_dir, "--texts-file", bad, "-o", out)
    refused(capsys, extract_attention.main, ["--layer 2", "2 encoder layers"],
            "--model_dir", t5_dir, "--source", "a", "--target", "b", "--layer", "2", "-o", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_version_1_files_are_still_read(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "old.h5"
    ok(capsys, extract_attention.main, "--model_dir", tiny_model_dir("bert"), "--text", "the cat", "-o", out, "-q",
       "--schema-version", "2")
    with h5py.File(out, "r+") as f:
        f.attrs["schema_version"] = 1  # as written before encoder-decoder support
    with open_attention(out) as f:
        assert f.meta.schema_version == 1 and not f.meta.is_seq2seq and f[0].target is None


@pytest.mark.slow
def test_seed003_flow_as_a_user_types_it(seq2seq_dir, tmp_path):
    """Subprocesses: --source/--target -> JSON -> seed 003's three figures."""
    out, figs = tmp_path / "pair.json", tmp_path / "plots"
    figs.mkdir()
    proc = run_script("extract_attention.py", "--model_dir", seq2seq_dir("marian"), "--source",
                      "the cat sat on the mat", "--target", "a cat sat", "--output_file", out, "--verify")
    assert proc.returncode == 0 and "verified against transformers eager" in proc.stderr, proc.stderr
    proc = run_script("visualize_attention.py", "--input_file", out, "--mode", "seq2seq", "--output-dir", figs)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in figs.iterdir()) == sorted(name.format(N=2) for name in SEED003)


def test_verify_stops_a_seq2seq_run_whose_cross_attention_drifts(seq2seq_dir, tmp_path, monkeypatch):
    """--verify compares all three attentions: a wrong scale in cross-attention alone is caught."""
    from attnpipe.extract import runner as extraction
    from attnpipe.errors import AttnpipeError
    from attnpipe.extract.corpus import Pair
    from attnpipe.models import bart

    real_attend = bart._attend

    def drifting(att, x, memory, mask, num_heads):
        if memory is not x:  # cross-attention: keys come from the encoder
            att = bart.Attention(att.q, att.k, att.v, att.o, scale=att.scale * 1.05)
        return real_attend(att, x, memory, mask, num_heads)

    monkeypatch.setattr(bart, "_attend", drifting)
    output = tmp_path / "out.h5"
    config = extraction.ExtractConfig(
        texts=(), pairs=(Pair("p", "the cat sat on the mat", "a dog ran"),), output=output,
        model_dir=seq2seq_dir("marian"), verify=True, progress=False,
    )
    with pytest.raises(AttnpipeError, match=r"--verify failed: pair 'p' cross attention layer \d head \d"):
        extraction.extract(config)
    assert list(tmp_path.iterdir()) == []


def test_pairs_are_tokenized_per_batch_and_batching_changes_nothing(seq2seq_dir, pairs_file, tmp_path, capsys,
                                                                    monkeypatch):
    """Pairs go through the runner's token-budget batches and each batch is tokenized on its own
    (the corpus's encodings are never all held at once): one pair per batch or all in one, the
    file holds the same arrays in the user's order, and no tokenizer call sees more texts than
    one batch (plus the windowed length pass)."""
    from attnpipe.extract import inputs

    model_dir = seq2seq_dir("bart")
    ok(capsys, extract_attention.main, "--model_dir", model_dir, "--texts-file", pairs_file, "-o", tmp_path / "all.h5",
       "-q")
    sizes = []
    real_encode = inputs.encode
    monkeypatch.setattr("attnpipe.extract.pairs.encode",
                        lambda tokenizer, texts, n: sizes.append(len(texts)) or real_encode(tokenizer, texts, n))
    ok(capsys, extract_attention.main, "--model_dir", model_dir, "--texts-file", pairs_file, "-o", tmp_path / "one.h5",
       "--batch-size", "1", "-q")
    assert sizes == [1] * 2 * len(PAIRS)  # source and target of each one-pair batch
    with open_attention(tmp_path / "all.h5") as together, open_attention(tmp_path / "one.h5") as alone:
        assert together.ids == alone.ids == ("short", "long", "mid")
        for a, b in zip(together, alone, strict=True):  # padding changes matmul shapes: float32 rounding only
            np.testing.assert_allclose(b.attention, a.attention, atol=2e-6)  # float32 rounding of differently padded batches: 1.07e-6 seen on this CPU
            np.testing.assert_allclose(b.target.decoder_attention, a.target.decoder_attention, atol=2e-6)
            np.testing.assert_allclose(b.target.cross_attention, a.target.cross_attention, atol=2e-6)
            assert b.target.tokens == a.target.tokens and b.tokens == a.tokens
