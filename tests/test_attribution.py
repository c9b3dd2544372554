"""Integrated-gradients attention attribution (attnpipe/extract/attribution.py, --attribution ig)
and its stage-2 analyses (attnpipe/analyze/attribution.py).

The specification is completeness (Σ Attr = F(A) − F(0) as the quadrature converges) on every
family the gradients cover, and equality with captum's LayerIntegratedGradients on transformers'
own GPT-2, whose eager attention passes through a module (`attn_dropout`) captum can hook.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from attnpipe.extract import attribution as IG
from attnpipe.extract import gradients as G
from attnpipe.extract.loading import load_model
from attnpipe.store import open_attention

TEXT = "the cat sat on the mat and it was red"


def ids_of(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


def completeness(model, objective, batch, steps, method="gausslegendre"):
    """(|gap| / |F| per (kind, layer), F) for every layer of every kind."""
    result = G.text_gradients(model, objective, batch)
    layers = {kind: range(values.shape[0]) for kind, values in result.attention.items()}
    attr = IG.attention_attribution(model, objective, batch, result.target_label, layers, steps, method)
    for kind in layers:  # the attribution has the attention's shape and is 0 where the attention is
        assert attr.attribution[kind].shape == result.attention[kind].shape
        assert not attr.attribution[kind][result.attention[kind] == 0].any()
    gaps = np.concatenate([np.abs(attr.gap[kind]) for kind in layers])
    return gaps / abs(result.target_value), result.target_value


# The bar is a gap ≤ 1e-3 of |F| at M = 64. The tiny Llama (initializer_range 0.5, no
# attention bias) needs more steps: with layer 0's attention scaled towards 0 its RMSNorm sees a
# small residual and F varies sharply for α < 0.1 (F(0) = 0.396, F(0.01) = 0.435, F(0.1) = 0.279),
# so it converges later: gap 7.9e-3 at 64, 2.8e-4 at 128, 8e-7 at 256 steps (relative to F).
@pytest.mark.parametrize("model_type,spec,steps", [("bert", "similarity:the dog ran fast", 64),
                                                   ("gpt2", "output-norm", 64), ("llama", "similarity:a red mat", 256)])
def test_completeness_gap_closes_as_steps_grow(tiny_model_dir, model_type, spec, steps):
    model = load_model(tiny_model_dir(model_type), torch.device("cpu"))
    objective = G.build_objective(model, G.parse_target(spec), lambda text: ids_of(model, text))
    ids = ids_of(model, TEXT)
    coarse, _ = completeness(model, objective, ids, 4)
    fine, _ = completeness(model, objective, ids, steps)
    assert fine.max() <= 1e-3, fine
    assert fine.max() < coarse.max()


def test_completeness_for_every_attention_kind_of_an_encoder_decoder(tmp_path):
    """BART (GELU). The tiny T5's ReLU feed-forward makes F(α) piecewise smooth, with kinks where a
    unit switches, and the quadrature then converges slowly and unevenly (encoder layer 0: gap 3.4e-2
    at 64 steps, 1.1e-3 at 128, 3.0e-3 at 256): completeness holds only in the limit there."""
    from seq2seq_tiny import save_tiny_seq2seq

    model = load_model(save_tiny_seq2seq("bart", tmp_path / "bart", lm_head=True), torch.device("cpu"))
    objective = G.build_objective(model, G.parse_target("next-token"))
    src, dec = torch.tensor([[7, 12, 9, 30, 41, 8, 55, 1]]), torch.tensor([[0, 17, 23, 9, 61, 14]])
    batch = {"input_ids": src, "attention_mask": torch.ones_like(src),
             "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}
    gaps, _ = completeness(model, objective, batch, 64)
    assert gaps.max() <= 1e-3, gaps  # encoder, decoder and cross layers
    import extract_attention  # and the CLI stores every kind's, on the stored layers

    out = tmp_path / "pair.json"
    assert extract_attention.main(["--model_dir", str(tmp_path / "bart"), "--source", "the cat sat", "--target",
                                   "a dog ran", "--explain", "next-token", "--attribution", "ig", "--layer", "-1",
                                   "-q", "--output_file", str(out)]) == 0
    with open_attention(out) as f:
        item = f[0]
        assert item.attention_attribution.shape == item.attention.shape
        assert item.target.decoder_attention_attribution.shape == item.target.decoder_attention.shape
        assert item.target.cross_attention_attribution.shape == item.target.cross_attention.shape
        assert item.target.cross_attribution_gap.shape == item.target.decoder_attribution_delta.shape == (1,)


def test_completeness_for_images_and_a_torch_encoder(tiny_vit_dir):
    from types import SimpleNamespace

    from torch import nn

    from attnpipe.models import torch_encoder

    vit = load_model(tiny_vit_dir, torch.device("cpu"))
    pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    gaps, _ = completeness(vit, G.build_objective(vit, G.parse_target("output-norm")), {"pixel_values": pixels}, 64)
    assert gaps.max() <= 1e-3, gaps
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True)
    module = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    model = SimpleNamespace(family=torch_encoder, weights=torch_encoder.load_weights(module, causal=True))
    x = torch.randn(1, 6, 16, generator=torch.Generator().manual_seed(4))
    batch = {"inputs_embeds": x, "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    gaps, _ = completeness(model, G.build_objective(model, G.parse_target("output-norm")), batch, 64)
    assert gaps.max() <= 1e-3, gaps


def test_quadratures():
    for method in IG.IG_METHODS:
        alphas, weights = IG.quadrature(7, method)
        assert weights.sum() == pytest.approx(1.0) and (alphas > 0).all() and (alphas <= 1).all()
    alphas, weights = IG.quadrature(5, "gausslegendre")  # exact for a polynomial of degree 9
    assert (weights * alphas**9).sum() == pytest.approx(1 / 10, rel=1e-12)
    np.testing.assert_allclose(IG.quadrature(4, "riemann_right")[0], [0.25, 0.5, 0.75, 1.0])


@pytest.mark.parametrize("method", ["gausslegendre", "riemann_right"])
def test_equals_captum_layer_integrated_gradients_on_transformers_gpt2(tiny_model_dir, method):
    """captum hooks the output of GPT-2's `attn_dropout` (identity in eval), which transformers'
    GPT-2 applies to the softmax probabilities on its upcast eager path (reorder_and_upcast_attn;
    the same softmax in float32). LIG integrates that layer's output from a baseline to its value
    at the input; the baseline is made 0 by an input `s` that scales the probabilities going
    into the hooked module (s = 1 at the input, 0 at the baseline)."""
    captum_attr = pytest.importorskip("captum.attr")
    import transformers as T

    folder = tiny_model_dir("gpt2")
    ours = load_model(folder, torch.device("cpu"))
    objective = G.build_objective(ours, G.parse_target("output-norm"))
    ids = ids_of(ours, TEXT)
    layer, steps = 1, 16
    mine = IG.attention_attribution(ours, objective, ids, -1, {"self": [layer]}, steps, method)

    hf = T.GPT2Model.from_pretrained(folder, attn_implementation="eager", reorder_and_upcast_attn=True).eval()
    probe = hf.h[layer].attn.attn_dropout
    scale = {}
    handle = probe.register_forward_pre_hook(lambda module, args: (args[0] * scale["s"][:, None, None, None],))

    def forward(s, input_ids):
        scale["s"] = s
        return hf(input_ids=input_ids).last_hidden_state.mean(1).norm(dim=-1)  # output-norm

    try:
        lig = captum_attr.LayerIntegratedGradients(forward, probe)
        theirs, delta = lig.attribute(torch.ones(1), baselines=torch.zeros(1), additional_forward_args=(ids,),
                                      n_steps=steps, method=method, return_convergence_delta=True)
    finally:
        handle.remove()
    # float32 on both sides, different summation orders: agreement to float32 rounding
    np.testing.assert_allclose(mine.attribution["self"][0], theirs[0].detach().numpy(), rtol=1e-4, atol=1e-6)
    assert mine.gap["self"][0] == pytest.approx(float(delta[0]), abs=1e-5)


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny BERT with transformers' sequence-classification head (3 classes)."""
    import transformers as T
    from conftest import save_tiny_model, tiny_config

    folder = save_tiny_model("bert", tmp_path_factory.mktemp("clf"))
    torch.manual_seed(1)
    config = tiny_config("bert")
    config.num_labels = 3
    T.BertForSequenceClassification(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def attributed_file(classifier_dir, tmp_path_factory):
    """An HDF5 file of 3 texts with --attribution ig on every layer and head."""
    import extract_attention

    out = tmp_path_factory.mktemp("ig") / "ig.h5"
    assert extract_attention.main(["--model_dir", str(classifier_dir), "--text", TEXT, "--text", "a dog ran fast",
                                   "--text", "it was big and blue", "--explain", "predicted", "--attribution", "ig",
                                   "--output_file", str(out), "-q"]) == 0
    return out


def test_cli_stores_the_attribution_and_it_equals_the_library(classifier_dir, attributed_file, tmp_path):
    import extract_attention

    model = load_model(classifier_dir, torch.device("cpu"))
    objective = G.build_objective(model, G.parse_target("predicted"))
    with open_attention(attributed_file) as f:
        assert (f.meta.attribution, f.meta.attribution_steps, f.meta.attribution_method) == ("ig", 20, "gausslegendre")
        item = f[0]
        expected = IG.attention_attribution(model, objective, ids_of(model, TEXT), item.gradient_target_label,
                                            {"self": [0, 1]})
        np.testing.assert_array_equal(item.attention_attribution, expected.attribution["self"])
        np.testing.assert_allclose(item.attribution_gap, expected.gap["self"], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(item.attribution_delta, expected.delta["self"], rtol=1e-6)
    # a subset of layers and heads, JSON: the stored layers' heads of the same computation
    out = tmp_path / "one.json"
    assert extract_attention.main(["--model_dir", str(classifier_dir), "--text", TEXT, "--explain", "predicted",
                                   "--attribution", "ig", "--layer", "-1", "--heads", "1,3", "--ig-steps", "20",
                                   "--output_file", str(out), "-q"]) == 0
    with open_attention(out) as f:
        item = f[0]
        assert item.attention_attribution.shape == item.attention.shape == (1, 2, 12, 12)
        np.testing.assert_allclose(item.attention_attribution, expected.attribution["self"][1:, [1, 3]],
                                   rtol=1e-6, atol=1e-9)
        assert item.attribution_gap.shape == (1,)


@pytest.mark.parametrize("args,message", [
    (["--attribution", "ig"], "--attribution ig needs --explain T"),
    (["--explain", "output-norm", "--attribution", "ig", "--ig-steps", "0"], "--ig-steps must be at least 1, got 0"),
    (["--explain", "output-norm", "--ig-steps", "8"], "--ig-steps goes with --attribution ig"),
    (["--explain", "output-norm", "--attribution", "ig", "--ig-method", "riemann_left"],
     "--ig-method 'riemann_left' is not one of gausslegendre, riemann_right, riemann_middle"),
])
def test_cli_refuses_bad_attribution_flags(tiny_model_dir, tmp_path, capsys, args, message):
    import extract_attention
    from attnpipe.errors import run_cli

    out = tmp_path / "x.h5"
    capsys.readouterr()
    code = run_cli(extract_attention.main, ["--model_dir", str(tiny_model_dir("bert")), "--text", "the cat", *args,
                                            "--output_file", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- stage 2


def test_tree_edges_and_connected_edges_on_a_hand_made_attribution():
    from attnpipe.analyze import attribution as AT

    attr = np.zeros((2, 2, 3, 3))  # 2 layers, 2 heads, 3 tokens
    attr[0, 0, 1, 2], attr[0, 1, 1, 2] = 0.3, 0.3  # layer 0: 2 -> 1 sums to 0.6 (the max: score 1)
    attr[0, 0, 2, 0] = 0.3  # 0 -> 2, score 0.5 (reaches nothing reachable from the root)
    attr[1, 0, 0, 1] = 2.0  # layer 1: 1 -> 0 (the root, [CLS]), score 1
    attr[1, 1, 2, 2] = 0.5  # 2 -> 2, score 0.25: under tau
    edges = AT.tree_edges(attr, ["[CLS]", "a", "b"], [0, 1], threshold=0.4)
    assert sorted(zip(edges["layer"], edges["from_position"], edges["to_position"])) == [(0, 0, 2), (0, 2, 1), (1, 1, 0)]
    kept = AT.connected_edges(edges, [0, 1], root=0)
    assert sorted(zip(kept["layer"], kept["from_position"], kept["to_position"])) == [(0, 2, 1), (1, 1, 0)]
    assert kept.loc[kept["layer"] == 1, "score"].item() == 1.0


def test_attribution_and_sankey_commands(attributed_file, classifier_dir, tmp_path):
    import pandas as pd

    import analyze_attention

    out = tmp_path / "attr"
    assert analyze_attention.main(["attribution", str(attributed_file), "--output-dir", str(out), "--figures", "2"]) == 0
    importance = pd.read_csv(out / "head_importance_ig.csv")
    with open_attention(attributed_file) as f:
        expected = np.mean([item.attention_attribution.max(axis=(2, 3)) for item in f], axis=0)  # (L, H)
        gap = pd.read_csv(out / "attribution_gap.csv")
        assert len(gap) == len(f) * 2  # what the file recorded (20 steps: the tiny model is far from converged)
        np.testing.assert_allclose(gap["gap"], np.concatenate([item.attribution_gap for item in f]), rtol=1e-6)
    np.testing.assert_allclose(importance.sort_values(["layer", "head"])["importance"], expected.ravel(), rtol=1e-6)
    assert sorted(importance["rank"]) == list(range(1, 9))
    tree = pd.read_csv(out / "attribution_tree.csv")
    assert (tree["score"] > 0.4).all() and set(tree["text_id"]) <= {"text-0", "text-1", "text-2"}
    assert (out / "attribution_tree_1.png").stat().st_size > 0 and (out / "head_importance_ig.png").exists()
    for values in ("attention", "attribution"):
        flow = tmp_path / values
        assert analyze_attention.main(["sankey", str(attributed_file), "--output-dir", str(flow), "--values", values,
                                       "--top-k", "1", "--hubs", "2"]) == 0
        assert (flow / "sankey_0.png").exists()
    hubs = pd.read_csv(tmp_path / "attention" / "hubs.csv")
    with open_attention(attributed_file) as f:
        inflow = f[0].attention[1].mean(axis=0).sum(axis=0)  # layer 1, mean over heads, column sums
    first = hubs[(hubs["text_id"] == "text-0") & (hubs["layer"] == 1)]
    assert first["position"].tolist() == np.argsort(-inflow, kind="stable")[:2].tolist()


def test_stage_two_refusals(tiny_model_dir, tmp_path, capsys):
    import analyze_attention
    import extract_attention
    from attnpipe.errors import run_cli

    plain = tmp_path / "plain.h5"
    assert extract_attention.main(["--model_dir", str(tiny_model_dir("bert")), "--text", "the cat sat", "-q",
                                   "--output_file", str(plain)]) == 0
    for args, message in [
        (["attribution", str(plain)], "holds no attention attribution: extract it with --explain T --attribution ig"),
        (["sankey", str(plain), "--values", "attribution"], "--values attribution needs a file extracted with"),
        (["sankey", str(plain), "--top-k", "0"], "--top-k must be at least 1, got 0"),
        (["attribution", str(plain), "--threshold", "1.5"], "--threshold must be in [0, 1), got 1.5"),
    ]:
        capsys.readouterr()
        code = run_cli(analyze_attention.main, [*args, "--output-dir", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and message in err and err.count("\n") == 1, err
    assert analyze_attention.main(["sankey", str(plain), "--output-dir", str(tmp_path / "s")]) == 0  # any file


def test_pruning_by_each_score(classifier_dir, attributed_file):
    from attnpipe.analyze import pruning
    from attnpipe.extract.gradients import build_objective, parse_target

    model = load_model(classifier_dir, torch.device("cpu"))
    with open_attention(attributed_file) as f:
        scores = pruning.head_scores(f)
        texts = tuple(item.text for item in f)
    assert scores["attribution"].shape == scores["gate-gradient"].shape == (2, 4)
    objective = build_objective(model, parse_target("predicted"))
    curves = pruning.prune_curves(model, objective, pruning.Labelled(texts, (-1, -1, -1)), scores, [0, 2, 8],
                                  random_orders=3)
    none = curves[curves["heads_pruned"] == 0]
    assert (none["accuracy"] == 1.0).all() and (none["logit_drop"].abs() < 1e-6).all()  # gold = predicted
    everything = curves[curves["heads_pruned"] == 8]  # every head pruned: the same model whatever the order
    assert np.ptp(everything["logit_drop"]) < 1e-6
    assert "| attribution | " in pruning.markdown_table(curves, "most")
