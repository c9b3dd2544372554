"""Gradient-weighted attention and Chefer relevance on hand-made arrays; the relevance subcommand."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest

import analyze_attention
from attnpipe.analyze import relevance as RV
from attnpipe.errors import AttnpipeError, run_cli
from attnpipe.analyze.rollout import rollout
from conftest import run_script


def random_rows(rng, shape):
    a = rng.random(shape)
    return a / a.sum(-1, keepdims=True)


def test_gradient_weighted_is_elementwise_product_with_absolute_gradient():
    a = np.array([[[[0.25, 0.75], [0.5, 0.5]]]])  # (1, 1, 2, 2)
    g = np.array([[[[-2.0, 1.0], [0.0, -4.0]]]])
    np.testing.assert_array_equal(RV.gradient_weighted(a, g), [[[[0.5, 0.75], [0.0, 2.0]]]])


def test_chefer_one_layer_by_hand():
    # two heads; ∇A ⊙ A per head, negatives clipped, mean over heads, then R = I + Ā
    a = np.array([[[[0.5, 0.5], [0.25, 0.75]], [[1.0, 0.0], [0.5, 0.5]]]])  # (1, 2, 2, 2)
    g = np.array([[[[2.0, -2.0], [4.0, 0.0]], [[-1.0, 3.0], [1.0, 1.0]]]])
    # head 0: [[1, -1], [1, 0]] -> [[1, 0], [1, 0]]; head 1: [[-1, 0], [0.5, 0.5]] -> [[0, 0], [.5, .5]]
    mean = np.array([[0.5, 0.0], [0.75, 0.25]])
    np.testing.assert_allclose(RV.chefer_layers(a, g)[0], mean)
    np.testing.assert_allclose(RV.chefer_relevance(a, g), np.eye(2) + mean)


def test_chefer_rolls_out_layers_in_order():
    rng = np.random.default_rng(0)
    a = random_rows(rng, (3, 2, 4, 4))
    g = rng.normal(size=(3, 2, 4, 4))
    layers = [np.clip(g[l] * a[l], 0, None).mean(0) for l in range(3)]
    expected = np.eye(4)
    for layer in layers:
        expected = expected + layer @ expected
    np.testing.assert_allclose(RV.chefer_relevance(a, g), expected)
    # from stored layer position 1: layer 0 is left out
    expected = np.eye(4)
    for layer in layers[1:]:
        expected = expected + layer @ expected
    np.testing.assert_allclose(RV.chefer_relevance(a, g, start=1), expected)
    # the order matters (a wrong order would pass a symmetric or 1-layer test)
    assert not np.allclose(RV.chefer_relevance(a[::-1].copy(), g[::-1].copy()), RV.chefer_relevance(a, g))


def test_with_gradient_equal_to_one_chefer_is_plain_attention_rollout_without_residual_mixing():
    rng = np.random.default_rng(1)
    a = random_rows(rng, (2, 3, 5, 5))
    relevance = RV.chefer_relevance(a, np.ones_like(a))
    mean = a.mean(1)
    np.testing.assert_allclose(relevance, (np.eye(5) + mean[1]) @ (np.eye(5) + mean[0]))


def fake_item(rng, n=5, layers=2, heads=3, with_grad=True):
    from attnpipe.store import TextAttention

    a = random_rows(rng, (layers, heads, n, n)).astype(np.float32)
    return TextAttention(
        id="t0", text="x", tokens=tuple(f"t{i}" for i in range(n)), token_ids=np.arange(n),
        special_tokens_mask=np.array([True] + [False] * (n - 2) + [True]), offsets=np.zeros((n, 2), np.int64),
        word_ids=np.arange(n), truncated=False, num_tokens_untruncated=n, attention=a,
        attention_grad=rng.normal(size=a.shape).astype(np.float32) if with_grad else None,
        head_gate_grad=rng.normal(size=(layers, heads)).astype(np.float32) if with_grad else None,
        token_grad_input=rng.normal(size=n).astype(np.float32) if with_grad else None,
        gradient_target_value=1.0 if with_grad else None, gradient_target_label=0 if with_grad else None,
    )


def test_token_scores_rows_and_methods():
    rng = np.random.default_rng(2)
    item = fake_item(rng)
    scores = RV.token_scores(item, [0, 1], row=0)
    assert set(scores) == {*RV.METHODS, "grad_input"}
    assert all(v.shape == (5,) for v in scores.values())
    np.testing.assert_allclose(scores["raw"], item.attention[-1].mean(0)[0], rtol=1e-6)
    np.testing.assert_allclose(scores["rollout"], rollout(item.attention)[0])
    chefer = RV.chefer_relevance(item.attention, item.attention_grad) - np.eye(5)
    np.testing.assert_allclose(scores["chefer"], chefer[0])
    np.testing.assert_allclose(scores["gradweight"], (item.attention[-1] * np.abs(item.attention_grad[-1])).mean(0)[0],
                               rtol=1e-6)
    np.testing.assert_allclose(scores["grad_input"], np.abs(item.token_grad_input))
    assert RV.default_query_row("gpt2", 7) == 6 and RV.default_query_row("bert", 7) == 0


def test_no_gradients_is_a_clear_error():
    item = fake_item(np.random.default_rng(3), with_grad=False)
    with pytest.raises(AttnpipeError, match="extract it with --explain"):
        RV.text_relevance(item, [0, 1])


def test_relevance_subcommand(tiny_model_dir, tmp_path, capsys):
    folder = tiny_model_dir("bert")
    path = tmp_path / "g.h5"
    result = run_script("extract_attention.py", "--model_dir", folder, "--text", "the cat sat", "--text",
                        "a dog ran on the mat", "--explain", "similarity:the red mat", "--output_file", path, "-q")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "rel"
    assert run_cli(analyze_attention.main, ["relevance", str(path), "--output-dir", str(out), "--figures", "2"]) == 0
    table = pd.read_csv(out / "relevance.csv")
    assert set(table["text_id"]) == {"text-0", "text-1"} and len(table) == 5 + 8
    assert {"raw", "rollout", "gradweight", "chefer", "grad_input"} <= set(table.columns)
    assert (out / "relevance_0.png").stat().st_size > 0 and (out / "relevance_1.png").exists()
    heads = pd.read_csv(out / "head_importance.csv")
    assert len(heads) == 2 * 4 and (out / "head_importance.png").exists()

    plain = tmp_path / "plain.h5"
    assert run_script("extract_attention.py", "--model_dir", folder, "--text", "the cat", "--output_file",
                      plain, "-q").returncode == 0
    capsys.readouterr()
    assert run_cli(analyze_attention.main, ["relevance", str(plain), "--output-dir", str(tmp_path / "x")]) == 2
    assert "extract it with --explain" in capsys.readouterr().err
