"""Circuit detectors on planted heads, against TransformerLens's and Clark et al.'s formulas (numbers
saved once in tests/data/detector_references.json), the probe corpus, and the circuits command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from attnpipe.analyze import circuits as C
from attnpipe.analyze import clark
from attnpipe.analyze import metric_reference as R
from attnpipe.analyze.clustering import head_distances, js_distance

ROOT = Path(__file__).resolve().parents[1]
REFERENCES = json.loads((ROOT / "tests" / "data" / "detector_references.json").read_text())


def probe_ids(prefix: int, length: int, seed: int = 0) -> np.ndarray:
    """BOS + prefix + A + A with distinct tokens inside A (so every repeat has one earlier copy)."""
    rng = np.random.default_rng(seed)
    a = rng.permutation(np.arange(100, 200))[:length]
    start = rng.permutation(np.arange(200, 300))[:prefix]
    return np.concatenate([[0], start, a, a])


def uniform_causal(n: int) -> np.ndarray:
    return np.tril(np.ones((n, n))) / np.arange(1, n + 1)[:, None]


def planted(pattern: np.ndarray) -> np.ndarray:
    """A causal head putting all its weight, evenly, on the pattern's keys; row i on key 0 where
    the pattern has none (like a head resting on BOS)."""
    a = pattern.astype(float).copy()
    empty = a.sum(-1) == 0
    a[empty, 0] = 1.0
    return (a / a.sum(-1, keepdims=True))[None, None]  # (1, 1, n, n)


def test_planted_heads_score_one_on_their_own_detector():
    ids = probe_ids(prefix=3, length=8)
    patterns = C.detection_patterns(ids)
    for name, pattern in patterns.items():
        scores = C.detector_scores(planted(pattern), ids, causal=True)
        assert scores[name][0, 0] == pytest.approx(1.0, abs=1e-12), name
    # a perfect previous-token head is not an induction head, and vice versa
    prev = C.detector_scores(planted(patterns["previous_token"]), ids)
    ind = C.detector_scores(planted(patterns["induction"]), ids)
    assert prev["induction"][0, 0] < 0.2 and ind["previous_token"][0, 0] < 0.2


def test_uniform_head_scores_the_documented_chance_level():
    ids = probe_ids(prefix=2, length=6)
    n = len(ids)
    scores = C.detector_scores(uniform_causal(n)[None, None], ids, causal=True)
    chance = C.chance_scores(ids)
    harmonic = sum(1 / k for k in range(1, n + 1))
    assert chance["previous_token"] == pytest.approx((harmonic - 1) / (n - 1))  # mean of 1/(i+1), i >= 1
    # each repeated token i = 1 + p + L + t has one earlier copy: 1/(i+1) for both detectors
    rows = np.arange(1 + 2 + 6, n)
    assert chance["duplicate_token"] == pytest.approx(np.mean(1 / (rows + 1)))
    assert chance["induction"] == pytest.approx(np.mean(1 / (rows + 1)))
    for name in C.DETECTORS:
        assert scores[name][0, 0] == pytest.approx(chance[name])


def test_causal_masking_is_respected():
    ids = probe_ids(prefix=0, length=5)
    n = len(ids)
    for pattern in C.detection_patterns(ids, causal=True).values():
        assert not np.triu(pattern, k=1).any()  # never a key after the query
    # a bidirectional head on the token after a *later* copy scores 0 as causal, not as bidirectional
    future = np.zeros((n, n))
    for i in range(n):
        later = [p for p in range(i + 1, n - 1) if ids[p] == ids[i]]
        future[i, later[0] + 1 if later else i] = 1.0
    causal = C.detector_scores(future[None, None], ids, causal=True)["induction"][0, 0]
    assert causal == pytest.approx(0.0)
    # a text without repeats has no duplicate/induction rows: NaN, not 0
    none = C.detector_scores(uniform_causal(4)[None, None], [1, 2, 3, 4])
    assert np.isnan(none["duplicate_token"][0, 0]) and np.isnan(none["induction"][0, 0])
    assert C.chance_scores([1, 2, 3, 4])["previous_token"] > 0


def test_offset_profile_of_planted_fixed_offset_heads():
    n = 12
    heads = np.zeros((1, 3, n, n))
    for h, k in enumerate((0, 1, 5)):
        for i in range(n):
            heads[0, h, i, i - k if i >= k else 0] = 1.0
    profile = C.offset_profile(heads, max_offset=8)  # (1, 3, 9)
    for h, k in enumerate((0, 1, 5)):
        assert profile[0, h, k] == pytest.approx(1.0)  # every row i >= k puts all its weight there
        assert not profile[0, h, k + 1:].any()  # rows before k rest on key 0: offsets below k only
    assert profile.shape == (1, 3, 9)
    # previous_token is the offset-1 column (both average over rows i >= 1)
    ids = np.arange(n)
    assert C.detector_scores(heads, ids)["previous_token"][0] == pytest.approx(profile[0, :, 1])


def test_previous_token_detector_equals_the_metric():
    rng = np.random.default_rng(1)
    n = 10
    a = np.tril(rng.random((2, 3, n, n)))
    a /= a.sum(-1, keepdims=True)
    ids = rng.integers(0, 4, size=n)
    ours = C.detector_scores(a, ids)["previous_token"]
    metric = R.head_metrics(a, [str(i) for i in ids], metrics=["previous_token"])["previous_token"]
    np.testing.assert_allclose(ours, metric, rtol=1e-12)


@pytest.mark.parametrize("case", range(len(REFERENCES["transformer_lens"])))
def test_transformer_lens_scores_are_ours_times_defined_rows_over_n(case):
    """TransformerLens's "mul" score sums the pattern's weight over all n rows and divides by n;
    ours averages over the rows where the detector is defined: TL = ours · rows / n."""
    ref = REFERENCES["transformer_lens"][case]
    ids = np.asarray(ref["token_ids"])
    attention = np.asarray(ref["attention"])[None]  # (1, H, n, n)
    n = len(ids)
    ours = C.detector_scores(attention, ids, causal=True)
    rows = C.defined_rows(ids)
    for name in C.DETECTORS:
        converted = np.nan_to_num(ours[name][0]) * rows[name] / n
        np.testing.assert_allclose(converted, ref["scores"][name], rtol=1e-5, atol=1e-7)  # TL ran in float32


@pytest.mark.parametrize("case", range(len(REFERENCES["clark"])))
def test_clark_conventions_reproduced_and_converting_factors(case):
    ref = REFERENCES["clark"][case]
    tokens, attention = ref["tokens"], np.asarray(ref["attention"])
    n = len(tokens)
    kinds = clark.average_attention(attention, tokens)
    for kind, want in ref["average"].items():
        np.testing.assert_allclose(kinds[kind], want, rtol=1e-12)
    np.testing.assert_allclose(clark.entropy(attention), ref["entropy"], rtol=1e-12)
    np.testing.assert_allclose(clark.js_divergence(attention), ref["js_divergence"], rtol=1e-10, atol=1e-15)
    ours = R.head_metrics(attention, tokens, causal=False)
    # previous / next token: theirs divide by n, ours average over the n - 1 defined rows
    np.testing.assert_allclose(ours["previous_token"] * (n - 1) / n, ref["average"]["left"], rtol=1e-12)
    np.testing.assert_allclose(ours["next_token"] * (n - 1) / n, ref["average"]["right"], rtol=1e-12)
    np.testing.assert_allclose(ours["self"], ref["average"]["self"], rtol=1e-12)  # same convention
    # entropy: their smoothing adds entropy, at most 1e-4·(ln n + 1) + 1e-4 nats per row here
    gap = np.asarray(ref["entropy"]) - ours["entropy"]
    assert np.all(gap > 0) and np.all(gap < 1e-4 * (np.log(n) + 2) + 1e-3)
    # a typed "[CLS]" after position 0 counts for them, never for our first_token
    if tokens.count("[CLS]") > 1:
        assert np.all(np.asarray(ref["average"]["cls"]) > ours["first_token"])
    # JS: theirs = Σ_rows JSD in nats (smoothed); ours = mean_rows √JSD in bits (unsmoothed). Per row,
    # JSD_nats = ln 2 · d², so theirs ≈ ln 2 · Σ_rows d²; their smoothing keeps it within 5% here.
    flat = attention.reshape(-1, n, n)  # (K, n, n)
    rows = np.stack([js_distance(flat[:, None, q], flat[None, :, q]) for q in range(n)])  # (n, K, K)
    np.testing.assert_allclose(clark.js_divergence(attention), np.log(2) * (rows ** 2).sum(0), rtol=0.05, atol=1e-3)
    np.testing.assert_allclose(head_distances(attention), rows.mean(0), rtol=1e-9, atol=1e-12)  # ours: the mean


def test_probe_corpus_is_reproducible_and_round_trips(tmp_path):
    import transformers

    from attnpipe.extract.probes import ProbeSpec, probe_records

    tokenizer = transformers.AutoTokenizer.from_pretrained(ROOT / "data" / "probes" / "tokenizer")
    committed = [json.loads(line) for line in
                 (ROOT / "data" / "probes" / "induction.jsonl").read_text().splitlines()]
    again = probe_records(tokenizer, ProbeSpec(num_texts=32, seed=1))
    assert again == committed  # the file is what the generator writes (README's command)
    for record in committed:
        ids = tokenizer(record["text"])["input_ids"]
        prefix, length = record["prefix"], record["length"]
        assert ids[0] == tokenizer.bos_token_id and len(ids) == 1 + prefix + 2 * length
        assert ids[1 + prefix: 1 + prefix + length] == ids[1 + prefix + length:]
        assert 10 <= length <= 40 and 0 <= prefix <= 10
    assert probe_records(tokenizer, ProbeSpec(num_texts=3, seed=2)) != committed[:3]


def test_commands_on_a_tiny_gpt2_file(tiny_model_dir, tmp_path, capsys):
    """Probe corpus through another tokenizer, extraction, then circuits / metrics --detectors / clark
    in-process: the detector rows of the metrics table are the circuits table's."""
    import pandas as pd
    import transformers

    import analyze_attention
    import extract_attention
    from attnpipe.errors import run_cli
    from attnpipe.extract.probes import ProbeSpec, probe_records

    model = tiny_model_dir("gpt2")
    records = probe_records(transformers.AutoTokenizer.from_pretrained(model),
                            ProbeSpec(num_texts=3, seed=0, min_length=4, max_length=8, max_prefix=2))
    corpus = tmp_path / "probes.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in records))
    h5 = tmp_path / "a.h5"
    assert run_cli(extract_attention.main, ["--model_dir", str(model), "--texts-file", str(corpus),
                                            "--dtype", "float32", "--output_file", str(h5)]) == 0
    assert run_cli(analyze_attention.main, ["circuits", str(h5), "--output-dir", str(tmp_path / "c")]) == 0
    assert run_cli(analyze_attention.main, ["metrics", str(h5), "--output-dir", str(tmp_path / "m"),
                                            "--metrics", "entropy", "--detectors", "--bootstrap", "10"]) == 0
    assert run_cli(analyze_attention.main, ["clark", str(h5), "--output-dir", str(tmp_path / "k")]) == 0
    capsys.readouterr()
    circuits = pd.read_csv(tmp_path / "c" / "detectors.csv")
    metrics = pd.read_csv(tmp_path / "m" / "metrics.csv")
    assert set(metrics["metric"]) == {"entropy", *C.DETECTORS}
    merged = circuits.merge(metrics, on=["text_id", "layer", "head", "metric"], suffixes=("_c", "_m"))
    assert len(merged) == 3 * 2 * 4 * 3  # texts x layers x heads x detectors
    np.testing.assert_allclose(merged["value_c"], merged["value_m"], rtol=1e-12)
    sidecar = json.loads((tmp_path / "m" / "metrics.columns.json").read_text())
    assert "induction" in sidecar["metrics"]
    assert (tmp_path / "c" / "circuits.md").read_text().startswith("# Circuits over training")
    heads = pd.read_csv(tmp_path / "k" / "clark_heads.csv")
    assert list(heads.columns) == ["layer", "head", *clark.KINDS, "entropy"] and len(heads) == 8
