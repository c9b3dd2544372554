"""Faithfulness check: deletion order, Spearman, AOPC on a target whose token effects are known,
and the faithfulness subcommand on a tiny classifier."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

import analyze_attention
from attnpipe.analyze import faithfulness as FF
from attnpipe.errors import run_cli
from conftest import run_script
from test_gradients import classifier_dir  # noqa: F401 - the tiny classifier fixture
from test_relevance import fake_item


def test_deletion_order_highest_first_ties_by_position():
    scores = np.array([9.0, 0.5, 2.0, 0.5, 3.0, 9.0])
    np.testing.assert_array_equal(FF.deletion_order(scores, np.array([1, 2, 3, 4])), [4, 2, 1, 3])


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, 12).astype(float)
    b = rng.normal(size=12)
    assert FF.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic)
    assert np.isnan(FF.spearman(np.ones(4), b[:4]))


def test_counts_and_aopc():
    assert FF.counts(7) == [1, 1, 2, 3, 4]  # round(0.7, 1.4, 2.1, 2.8, 3.5); 3.5 rounds half to even
    assert FF.aopc(np.array([1.0, 2.0, 3.0])) == 2.0


class AdditiveDeleter:
    """A 'model' whose target is Σ of per-token effects of the tokens not deleted: the ideal
    ranking is by effect, so a method scoring by the true effects reaches the best AOPC and
    beats the random baseline."""

    def __init__(self, effects):
        self.effects = np.asarray(effects, dtype=float)

    def values(self, token_ids, deletions, label):
        return np.array([self.effects.sum() - self.effects[np.asarray(d, dtype=int)].sum() for d in deletions])


def test_aopc_of_true_effects_is_the_best_and_beats_random():
    rng = np.random.default_rng(4)
    n = 12
    item = fake_item(rng, n=n)
    effects = np.zeros(n)
    effects[1:-1] = np.linspace(1.0, 0.0, n - 2)  # content tokens; specials have no effect
    item = item.__class__(**{**item.__dict__, "token_grad_input": effects.astype(np.float32)})
    table, rhos = FF.text_curves(item, [0, 1], "bert", AdditiveDeleter(effects), methods=("raw",))
    curve = table.groupby("method")["drop"].apply(lambda d: FF.aopc(d.to_numpy()))
    # grad_input here *is* the true effect: the best possible ranking
    ks = FF.counts(n - 2)
    best = np.mean([np.sort(effects[1:-1])[::-1][:k].sum() for k in ks])
    assert curve["grad_input"] == pytest.approx(best)
    assert curve["grad_input"] > curve["random"] > 0
    assert rhos["grad_input"] == pytest.approx(1.0)
    assert set(table["method"]) == {"raw", "grad_input", "random"}


@pytest.mark.slow
def test_faithfulness_subcommand(classifier_dir, tmp_path, capsys):  # noqa: F811 - fixture
    path = tmp_path / "g.h5"
    texts = ["the cat sat on the mat", "a dog ran fast and it was big", "the red mat was small"]
    args = [a for t in texts for a in ("--text", t)]
    result = run_script("extract_attention.py", "--model_dir", classifier_dir, *args, "--explain", "predicted",
                        "--output_file", path, "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "faith"
    capsys.readouterr()
    assert run_cli(analyze_attention.main, ["faithfulness", str(path), "--output-dir", str(out)]) == 0
    summary = pd.read_csv(out / "faithfulness.csv")
    assert list(summary["method"]) == ["raw", "rollout", "flow", "gradweight", "chefer", "grad_input", "random"]
    assert (summary["texts"] == 3).all() and summary["aopc"].notna().all()
    assert summary.set_index("method").loc["grad_input", "spearman_grad_input"] == pytest.approx(1.0)
    curves = pd.read_csv(out / "perturbation_curves.csv")
    assert len(curves) == 7 * len(FF.FRACTIONS)
    assert (out / "perturbation_curves.png").exists() and "| chefer |" in (out / "faithfulness.md").read_text()
    assert "| random |" in capsys.readouterr().out
    # another model's weights are refused
    other = tmp_path / "other"
    other.mkdir()
    from conftest import save_tiny_model

    save_tiny_model("bert", other, seed=5)
    assert run_cli(analyze_attention.main, ["faithfulness", str(path), "--output-dir", str(out),
                                            "--model_dir", str(other)]) == 2
    assert "weights differ" in capsys.readouterr().err


@pytest.mark.parametrize("model_type,spec", [("gpt2", "next-token"), ("bert", "similarity:the red mat")])
def test_deleter_masks_or_removes_tokens(tiny_model_dir, model_type, spec):
    """Masking keeps the length and puts the mask id at the deleted positions; a tokenizer without
    a mask token (GPT-2 here) has the tokens removed. Each value equals a plain run on that input."""
    import torch

    from attnpipe.extract import gradients as G
    from attnpipe.extract.loading import load_model

    model = load_model(tiny_model_dir(model_type), torch.device("cpu"))
    ids = np.array(model.tokenizer("the cat sat on the mat")["input_ids"])
    encode = lambda text: torch.tensor([model.tokenizer(text)["input_ids"]])  # noqa: E731
    objective = G.build_objective(model, G.parse_target(spec), encode)
    mask_id = None if model_type == "gpt2" else model.tokenizer.mask_token_id
    deleter = FF.Deleter(model, objective, mask_id)
    deletions = [np.array([], dtype=int), np.array([2]), np.array([1, 3])]
    got = deleter.values(ids, deletions, label=5 if model_type == "gpt2" else -1)
    for value, positions in zip(got, deletions):
        changed = ids.copy()
        if mask_id is None:
            changed = np.delete(changed, positions)
        else:
            changed[positions] = mask_id
        with torch.no_grad():
            out = G.run(model, torch.as_tensor(changed[None]))
            expected = float(objective.value(out.hidden, 5 if model_type == "gpt2" else -1)[0])
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-6)  # batched vs single: float32 rounding
    assert got[0] != pytest.approx(got[2])
