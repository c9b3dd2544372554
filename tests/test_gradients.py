"""Head gates and gradients through our forward pass (attnpipe/extract/gradients.py).

Finite-difference checks run in float64 on tiny random models, so a central difference with
eps = 1e-6 agrees with autograd to ~1e-8 relative: a wrong gradient (a missed path, a wrong
sign, a gate placed after the output projection) is off by orders of magnitude more.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from attnpipe.extract import gradients as G
from attnpipe.extract.loading import load_model
from attnpipe.store import open_attention
from conftest import run_script, save_tiny_model

EPS = 1e-6
FD_RTOL, FD_ATOL = 1e-6, 1e-9  # float64 central differences: truncation ~eps², rounding ~1e-16/eps


def float64(model):
    """The same LoadedModel computed in float64 (weights re-read from the converted HF model)."""
    hf = model.hf_model.double()
    return dataclasses.replace(model, hf_model=hf, weights=model.family.load_weights(hf))


def ids_of(model, text: str) -> torch.Tensor:
    return torch.tensor([model.tokenizer(text)["input_ids"]])


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    """A tiny BERT with transformers' sequence-classification head (3 classes), saved like a user's."""
    import transformers as T

    from conftest import tiny_config

    folder = save_tiny_model("bert", tmp_path_factory.mktemp("clf"))  # tokenizer + base weights
    torch.manual_seed(1)
    config = tiny_config("bert")
    config.num_labels = 3
    T.BertForSequenceClassification(config).save_pretrained(folder)  # overwrites config + weights
    return folder


@pytest.mark.parametrize("model_type", ["bert", "gpt2", "llama"])
def test_gates_at_one_are_bit_identical(tiny_model_dir, model_type):
    model = load_model(tiny_model_dir(model_type), torch.device("cpu"))
    ids = torch.tensor([[2, 7, 8, 9, 10, 11, 3], [2, 12, 13, 14, 3, 0, 0]])
    mask = torch.tensor([[1] * 7, [1] * 5 + [0] * 2])
    batch = {"input_ids": ids, "attention_mask": mask}
    plain = model.family.forward(model.weights, batch)
    gated = model.family.forward(model.weights, batch, head_gates={"self": torch.ones(model.num_layers, model.num_heads)})
    assert torch.equal(plain.hidden, gated.hidden)
    assert all(torch.equal(plain.attentions["self"][l], gated.attentions["self"][l]) for l in plain.attentions["self"])
    # and a gate does act: zeroing one head changes the output
    gates = torch.ones(model.num_layers, model.num_heads)
    gates[0, 1] = 0.0
    zeroed = model.family.forward(model.weights, batch, head_gates={"self": gates}).hidden
    assert not torch.equal(plain.hidden, zeroed)
    # per-text gates (L, B, H): text 0 ungated, text 1 with head (0, 1) zeroed, in one batch
    per_text = torch.stack([torch.ones_like(gates), gates], dim=1)  # (L, 2, H)
    both = model.family.forward(model.weights, batch, head_gates={"self": per_text}).hidden
    assert torch.equal(both[0], plain.hidden[0]) and torch.equal(both[1], zeroed[1])


def objective_value(model, objective, ids, gates=None, label=None):
    with torch.no_grad():
        out = G.run(model, ids, None if gates is None else {"self": gates})
        label = objective.choose(out.hidden) if label is None else label
        return float(objective.value(out.hidden, label)[0]), label


CASES = [("bert", "similarity:the dog ran fast"), ("gpt2", "next-token"), ("llama", "similarity:a red mat")]


def _model_and_objective(tiny_model_dir, classifier_dir, model_type, spec):
    folder = classifier_dir if model_type == "classifier" else tiny_model_dir(model_type)
    model = float64(load_model(folder, torch.device("cpu")))
    objective = G.build_objective(model, G.parse_target(spec), lambda text: ids_of(model, text))
    return model, objective


@pytest.mark.parametrize("model_type,spec", CASES + [("classifier", "predicted"), ("classifier", "2")])
def test_gate_gradient_matches_finite_differences(tiny_model_dir, classifier_dir, model_type, spec):
    model, objective = _model_and_objective(tiny_model_dir, classifier_dir, model_type, spec)
    ids = ids_of(model, "the cat sat on the mat and it was red")
    result = G.text_gradients(model, objective, ids)
    assert result.head_gate_grad["self"].shape == (model.num_layers, model.num_heads)
    for layer, head in [(0, 0), (model.num_layers - 1, model.num_heads - 1), (1, 2)]:
        gates = torch.ones(model.num_layers, model.num_heads, dtype=torch.float64)
        gates[layer, head] += EPS
        up, _ = objective_value(model, objective, ids, gates, result.target_label)
        gates[layer, head] -= 2 * EPS
        down, _ = objective_value(model, objective, ids, gates, result.target_label)
        assert result.head_gate_grad["self"][layer, head] == pytest.approx((up - down) / (2 * EPS), rel=FD_RTOL, abs=FD_ATOL)
    assert result.target_value == pytest.approx(objective_value(model, objective, ids)[0], abs=1e-12)


def nudged(monkeypatch, module, call: int, where: tuple[int, int, int], delta: float, evaluate):
    """evaluate() with `delta` added to probability [head, query, key] of text 0 in the `call`-th
    attention_probs call of a forward (the rest of the row left as it is, as autograd sees it)."""
    original = module.attention_probs
    calls = []

    def probs_with_nudge(*args, **kwargs):
        probs = original(*args, **kwargs)
        if len(calls) == call:
            probs = probs.clone()
            probs[(0, *where)] += delta
        calls.append(1)
        return probs

    monkeypatch.setattr(module, "attention_probs", probs_with_nudge)
    try:
        return evaluate()
    finally:
        monkeypatch.setattr(module, "attention_probs", original)


@pytest.mark.parametrize("model_type,spec", CASES + [("classifier", "predicted")])
def test_attention_gradient_matches_finite_differences(tiny_model_dir, classifier_dir, monkeypatch, model_type, spec):
    """∂target/∂A[l, h, q, k]: add ε to that one probability inside the forward (a wrapped
    attention_probs counting layers), leaving the rest of the row as it is, as autograd sees it."""
    model, objective = _model_and_objective(tiny_model_dir, classifier_dir, model_type, spec)
    ids = ids_of(model, "the cat sat on the mat and it was red")
    result = G.text_gradients(model, objective, ids)
    n = ids.shape[1]
    module = model.family

    def perturbed_value(layer, head, q, k, delta):
        return nudged(monkeypatch, module, layer, (head, q, k), delta,
                      lambda: objective_value(model, objective, ids, None, result.target_label)[0])

    last = model.num_layers - 1
    causal = module.CAUSAL
    row = n - 1 if causal else 0  # in the last layer only the row the target reads matters (or all)
    entries = [(0, 0, n - 1, 1), (last, 1, row, 2), (0, 3, 2, 1)]
    checked = 0
    for layer, head, q, k in entries:
        fd = (perturbed_value(layer, head, q, k, EPS) - perturbed_value(layer, head, q, k, -EPS)) / (2 * EPS)
        assert result.attention_grad["self"][layer, head, q, k] == pytest.approx(fd, rel=FD_RTOL, abs=FD_ATOL)
        checked += abs(fd) > 1e-6
    assert checked >= 2, "the checked entries should carry non-zero gradient"


def test_gradient_times_input_matches_transformers(classifier_dir):
    """Σ_e x·∂logit/∂x on the word embeddings equals the same from transformers' own classifier."""
    import transformers as T

    model, objective = _model_and_objective(None, classifier_dir, "classifier", "1")
    ids = ids_of(model, "the cat sat on the mat")
    result = G.text_gradients(model, objective, ids)
    clf = T.AutoModelForSequenceClassification.from_pretrained(classifier_dir, attn_implementation="eager",
                                                               dtype=torch.float64).eval()
    words = clf.bert.embeddings.word_embeddings(ids).detach().requires_grad_(True)

    def use_words(module, args, output):
        return words

    handle = clf.bert.embeddings.word_embeddings.register_forward_hook(use_words)
    try:
        clf(input_ids=ids).logits[0, 1].backward()
    finally:
        handle.remove()
    expected = (words.grad * words).sum(-1)[0].detach().numpy()
    np.testing.assert_allclose(result.token_grad_input, expected, rtol=1e-9, atol=1e-12)


def test_head_importance_equals_ablation_when_target_is_linear_in_the_gates(tiny_model_dir):
    """A 1-layer BERT whose output is linear in its gates: both layer norms replaced by the
    identity and the feed-forward output weights zeroed, so hidden = x + W_o·Σ_h g_h·c_h (+ b)
    with contexts c_h that do not depend on the gates. With the linear target w·hidden[0]
    (an Objective of our own), target(g) = a + Σ_h g_h·b_h: ∂target/∂g_h = b_h, and zeroing
    head h changes the target by exactly −b_h. Michel et al.'s importance is this first-order
    Taylor term; here it is exact, in general only an approximation."""
    model = float64(load_model(tiny_model_dir("bert"), torch.device("cpu")))
    first = model.weights.layers[0]
    linear_layer = dataclasses.replace(
        first,
        attn_norm=lambda x: x,
        ff_norm=lambda x: x,
        ff_out=dataclasses.replace(first.ff_out, weight=torch.zeros_like(first.ff_out.weight),
                                   bias=torch.zeros_like(first.ff_out.bias)),
    )
    model = dataclasses.replace(model, weights=dataclasses.replace(model.weights, layers=(linear_layer,)))
    torch.manual_seed(0)
    w = torch.randn(model.weights.word.shape[1], dtype=torch.float64)
    objective = G.Objective(G.Target("class", "linear"), lambda hidden: -1, lambda hidden, label: hidden[:, 0] @ w)
    ids = ids_of(model, "the cat sat on the mat")
    result = G.text_gradients(model, objective, ids, ablate=True)
    assert result.head_gate_grad["self"].shape == (1, 4)
    np.testing.assert_allclose(result.head_ablation["self"], -result.head_gate_grad["self"], rtol=1e-10, atol=1e-12)
    assert np.abs(result.head_gate_grad["self"]).min() > 1e-3  # every head matters: the check is not 0 == 0


def test_ablation_runs_on_a_real_nonlinear_model(classifier_dir):
    model, objective = _model_and_objective(None, classifier_dir, "classifier", "predicted")
    result = G.text_gradients(model, objective, ids_of(model, "the dog ran"), ablate=True)
    assert result.head_ablation["self"].shape == (2, 4) and np.abs(result.head_ablation["self"]).max() > 0


def test_parse_target():
    assert G.parse_target("predicted").kind == "predicted"
    assert G.parse_target("3").class_index == 3
    assert G.parse_target("similarity:a b: c").other_text == "a b: c"
    for bad in ("-1", "banana", "similarity:  "):
        with pytest.raises(Exception, match="--explain"):
            G.parse_target(bad)


def test_cli_stores_gradients_and_reads_them_back(classifier_dir, tmp_path):
    out = tmp_path / "g.h5"
    result = run_script("extract_attention.py", "--model_dir", classifier_dir, "--text", "the cat sat",
                        "--text", "a dog ran fast", "--explain", "predicted", "--ablate", "--verify",
                        "--layer", "-1", "--heads", "1,2", "--output_file", out, "-q")
    assert result.returncode == 0, result.stderr
    with open_attention(out) as f:
        assert f.meta.schema_version == 3 and f.meta.gradient_target == "predicted"
        item = f[1]
        assert item.attention_grad.shape == item.attention.shape == (1, 2, 6, 6)
        assert item.head_gate_grad.shape == item.head_ablation.shape == (2, 4)
        assert item.token_grad_input.shape == (6,) and item.gradient_target_label in (0, 1, 2)
        mean = f.corpus_array("head_importance_mean")
        np.testing.assert_allclose(mean, (f[0].head_importance + f[1].head_importance) / 2, rtol=1e-6)
    json_out = tmp_path / "g.json"
    result = run_script("extract_attention.py", "--model_dir", classifier_dir, "--text", "the cat sat",
                        "--explain", "1", "--output_file", json_out, "-q")
    assert result.returncode == 0, result.stderr
    with open_attention(json_out) as f:
        assert f[0].gradient_target_label == 1 and f[0].attention_grad.shape == f[0].attention.shape


@pytest.mark.parametrize("model_type,args,message", [
    ("bert", ["--explain", "predicted"], "needs a sequence-classification head"),
    ("bert", ["--explain", "next-token"], "needs a causal language model"),
    ("bert", ["--ablate"], "--ablate needs --explain"),
    ("classifier", ["--explain", "7"], "out of range: the classifier has 3 classes"),
    ("llama", ["--explain", "next-token"], "needs the LM head's weights"),  # a base model, untied head
])
def test_cli_errors_for_targets_the_model_lacks(tiny_model_dir, classifier_dir, tmp_path, capsys, model_type, args,
                                                 message):
    import extract_attention

    from attnpipe.errors import run_cli

    folder = classifier_dir if model_type == "classifier" else tiny_model_dir(model_type)
    out = tmp_path / "x.h5"
    capsys.readouterr()  # drop what building the fixtures printed
    code = run_cli(extract_attention.main, ["--model_dir", str(folder), "--text", "the cat", *args,
                                            "--output_file", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error:") and message in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_version_1_files_are_still_read(tiny_model_dir, tmp_path):
    import h5py

    path = tmp_path / "v1.h5"
    assert run_script("extract_attention.py", "--model_dir", tiny_model_dir("bert"), "--text", "the cat",
                      "--output_file", path, "--schema-version", "2", "-q").returncode == 0
    with h5py.File(path, "a") as f:  # what a version-1 writer left: no target attribute
        f.attrs["schema_version"] = 1
        del f.attrs["gradient_target"]
        del f.attrs["attrs_crc32"]  # nor the strings' checksum, which came later
    with open_attention(path) as f:
        assert f.meta.schema_version == 1 and f.meta.gradient_target is None
        assert f[0].attention_grad is None and f[0].head_importance is None


# ---------------------------------------------------------------- encoder-decoders, ViT, torch encoder
#
# The same finite-difference checks through the family interface: every kind of attention
# ("self"; encoder-decoders also "decoder" and "cross"), in float64.

def _call_index(weights, kind: str, layer: int) -> int:
    """Which attention_probs call of a forward computes (kind, layer): the encoder's (or only)
    layers first, then each decoder layer's self-attention followed by its cross-attention."""
    if kind == "self":
        return layer
    return weights.num_layers + 2 * layer + (0 if kind == "decoder" else 1)


def _value(model, objective, batch, label, gates=None):
    with torch.no_grad():
        out = G.run(model, batch, gates)
        return float(objective.value(objective.states(out), label)[0])


def check_gate_gradients(model, objective, batch, result):
    for kind, (num_layers, num_heads) in G.gate_shapes(model.weights, model.family.KINDS).items():
        assert result.head_gate_grad[kind].shape == (num_layers, num_heads)
        for layer, head in [(0, 0), (num_layers - 1, num_heads - 1)]:
            gates = torch.ones(num_layers, num_heads, dtype=torch.float64)
            gates[layer, head] += EPS
            up = _value(model, objective, batch, result.target_label, {kind: gates})
            gates[layer, head] -= 2 * EPS
            down = _value(model, objective, batch, result.target_label, {kind: gates})
            assert result.head_gate_grad[kind][layer, head] == pytest.approx(
                (up - down) / (2 * EPS), rel=FD_RTOL, abs=FD_ATOL), (kind, layer, head)
    assert result.target_value == pytest.approx(_value(model, objective, batch, result.target_label), abs=1e-12)


def check_attention_gradients(model, objective, batch, result, monkeypatch, entries, nonzero_kinds):
    """entries: (kind, layer, head, query, key); each kind in nonzero_kinds must carry gradient."""
    def perturbed(kind, layer, head, q, k, delta):
        return nudged(monkeypatch, model.family, _call_index(model.weights, kind, layer), (head, q, k), delta,
                      lambda: _value(model, objective, batch, result.target_label))

    carrying = set()
    for kind, layer, head, q, k in entries:
        fd = (perturbed(kind, layer, head, q, k, EPS) - perturbed(kind, layer, head, q, k, -EPS)) / (2 * EPS)
        assert result.attention_grad[kind][layer, head, q, k] == pytest.approx(fd, rel=FD_RTOL, abs=FD_ATOL), (
            kind, layer, head, q, k)
        if abs(fd) > 1e-6:
            carrying.add(kind)
    assert carrying >= set(nonzero_kinds), f"checked entries of {set(nonzero_kinds) - carrying} carry no gradient"


@pytest.fixture(scope="module")
def seq2seq_lm_dir(tmp_path_factory):
    from seq2seq_tiny import save_tiny_seq2seq

    cache = {}

    def make(variant):
        if variant not in cache:
            cache[variant] = save_tiny_seq2seq(variant, tmp_path_factory.mktemp(variant), lm_head=True)
        return cache[variant]

    return make


SRC = [[7, 12, 9, 30, 41, 8, 55, 1]]  # (1, S) real ids, clear of the special ids
DEC = [[0, 17, 23, 9, 61, 14]]  # (1, T) start token + target prefix


def seq2seq_batch(model):
    start = model.hf_model.config.decoder_start_token_id
    src, dec = torch.tensor(SRC), torch.tensor([[start] + DEC[0][1:]])
    return {"input_ids": src, "attention_mask": torch.ones_like(src),
            "decoder_input_ids": dec, "decoder_attention_mask": torch.ones_like(dec)}


@pytest.mark.parametrize("variant,spec", [("t5", "next-token"), ("bart", "next-token"), ("marian", "next-token"),
                                          ("t5", "similarity:the dog ran fast"), ("bart", "output-norm")])
def test_seq2seq_gradients_match_finite_differences(seq2seq_lm_dir, monkeypatch, variant, spec):
    model = float64(load_model(seq2seq_lm_dir(variant), torch.device("cpu")))
    objective = G.build_objective(model, G.parse_target(spec), lambda text: ids_of(model, text))
    batch = seq2seq_batch(model)
    result = G.text_gradients(model, objective, batch, ablate=True)
    s, t = batch["input_ids"].shape[1], batch["decoder_input_ids"].shape[1]
    assert result.attention_grad["self"].shape == (model.num_layers, model.num_heads, s, s)
    assert result.attention_grad["decoder"].shape[2:] == (t, t)
    assert result.attention_grad["cross"].shape[2:] == (t, s)
    assert result.token_grad_input.shape == (s,)  # on the source tokens
    check_gate_gradients(model, objective, batch, result)
    enc_last, dec_last = model.num_layers - 1, model.weights.decoder_num_layers - 1
    entries = [("self", 0, 0, 1, 2), ("self", enc_last, 1, 3, 0),
               ("decoder", 0, 0, t - 1, 0), ("decoder", dec_last, 1, t - 1, 2),
               ("cross", 0, 1, 2, 4), ("cross", dec_last, 0, t - 1, 3)]
    reads_decoder = objective.reads == "hidden"
    check_attention_gradients(model, objective, batch, result, monkeypatch, entries,
                              ("self", "decoder", "cross") if reads_decoder else ("self",))
    if not reads_decoder:  # similarity reads the encoder states: the decoder is off the path
        assert not result.head_gate_grad["decoder"].any() and not result.attention_grad["cross"].any()
    for kind in model.family.KINDS:  # ablation: one value per head of each kind, and they act
        assert result.head_ablation[kind].shape == result.head_gate_grad[kind].shape
    assert np.abs(result.head_ablation["self"]).max() > 0


@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_seq2seq_next_token_is_the_lm_heads_logit(seq2seq_lm_dir, variant):
    """Our objective equals transformers' ...ForConditionalGeneration logit at the last decoder
    position: T5's d_model**-0.5 rescale before its tied head and BART's (here random)
    final_logits_bias are applied."""
    import transformers as T

    model = float64(load_model(seq2seq_lm_dir(variant), torch.device("cpu")))
    objective = G.build_objective(model, G.parse_target("next-token"))
    batch = seq2seq_batch(model)
    result = G.text_gradients(model, objective, batch)
    lm = T.AutoModelForSeq2SeqLM.from_pretrained(seq2seq_lm_dir(variant), attn_implementation="eager",
                                                 dtype=torch.float64).eval()
    with torch.no_grad():
        logits = lm(**batch, use_cache=False).logits[0, -1]  # (vocab,)
    assert result.target_label == int(logits.argmax())
    # transformers' T5LayerNorm takes the variance in float32 even in a float64 model (ours keeps
    # float64), so T5 agrees to float32 rounding; a missing rescale would be off by sqrt(d_model).
    rel = 1e-6 if variant == "t5" else 1e-9
    assert result.target_value == pytest.approx(float(logits[result.target_label]), rel=rel, abs=1e-9)


@pytest.fixture(scope="module")
def vit_classifier_dir(tmp_path_factory):
    """The tiny ViT of conftest with transformers' image-classification head (3 classes)."""
    import transformers as T

    from conftest import save_tiny_vit

    folder = save_tiny_vit(tmp_path_factory.mktemp("vitclf"))
    config = T.AutoConfig.from_pretrained(folder)
    config.num_labels = 3
    torch.manual_seed(2)
    T.ViTForImageClassification(config).save_pretrained(folder)  # overwrites config + weights
    return folder


def vit_model(folder):
    return float64(load_model(folder, torch.device("cpu")))  # the one loader reads image models too


@pytest.mark.parametrize("spec", ["predicted", "output-norm"])
def test_vit_gradients_match_finite_differences(vit_classifier_dir, monkeypatch, spec):
    import transformers as T

    model = vit_model(vit_classifier_dir)
    objective = G.build_objective(model, G.parse_target(spec))
    batch = {"pixel_values": torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3),
                                         dtype=torch.float64)}
    result = G.text_gradients(model, objective, batch, ablate=True)
    assert result.attention_grad["self"].shape == (2, 4, 17, 17) and result.token_grad_input.shape == (17,)
    check_gate_gradients(model, objective, batch, result)
    check_attention_gradients(model, objective, batch, result, monkeypatch,
                              [("self", 0, 0, 5, 1), ("self", 1, 3, 0, 9), ("self", 0, 2, 16, 0)], ("self",))
    assert result.head_ablation["self"].shape == (2, 4)
    if spec == "predicted":  # gradient x input on what the first layer receives, against transformers
        clf = T.AutoModelForImageClassification.from_pretrained(vit_classifier_dir, attn_implementation="eager",
                                                                dtype=torch.float64).eval()
        seen = {}

        def keep(module, args, output):
            seen["x"] = output.detach().requires_grad_(True)
            return seen["x"]

        handle = clf.vit.embeddings.register_forward_hook(keep)
        try:
            logits = clf(pixel_values=batch["pixel_values"]).logits[0]
            assert result.target_label == int(logits.argmax())
            logits[result.target_label].backward()
        finally:
            handle.remove()
        expected = (seen["x"].grad * seen["x"]).sum(-1)[0].detach().numpy()
        # transformers' ViT takes its softmax in float32 even in a float64 model: agreement is to
        # float32 rounding (a wrong input, e.g. before the position embeddings, is off by far more).
        np.testing.assert_allclose(result.token_grad_input, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("norm_first,causal", [(False, False), (True, True)], ids=["post-norm", "pre-norm-causal"])
def test_torch_encoder_gradients_match_finite_differences(monkeypatch, norm_first, causal):
    from types import SimpleNamespace

    from torch import nn

    from attnpipe.models import torch_encoder

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=24, dropout=0.0, batch_first=True,
                                       norm_first=norm_first)
    module = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16) if norm_first else None,
                                   enable_nested_tensor=False).double().eval()
    model = SimpleNamespace(family=torch_encoder, weights=torch_encoder.load_weights(module, causal=causal))
    objective = G.build_objective(model, G.parse_target("output-norm"))
    x = torch.randn(1, 6, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    batch = {"inputs_embeds": x, "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    result = G.text_gradients(model, objective, batch, ablate=True)
    assert result.attention_grad["self"].shape == (2, 4, 6, 6)
    if causal:
        assert not np.triu(result.attention["self"], 1).any()
    check_gate_gradients(model, objective, batch, result)
    check_attention_gradients(model, objective, batch, result, monkeypatch,
                              [("self", 0, 0, 5, 1), ("self", 1, 3, 4, 2), ("self", 0, 2, 3, 3)], ("self",))
    # gradient x input on the given embeddings, against the module's own forward
    given = x.clone().requires_grad_(True)
    mask = nn.Transformer.generate_square_subsequent_mask(6, dtype=torch.float64) if causal else None
    module(given, mask=mask, is_causal=causal).mean(1).norm(dim=-1)[0].backward()
    np.testing.assert_allclose(result.token_grad_input, (given.grad * given).sum(-1)[0].detach().numpy(),
                               rtol=1e-9, atol=1e-12)


def test_targets_a_family_lacks_are_refused(tiny_vit_dir):
    from types import SimpleNamespace

    from attnpipe.errors import AttnpipeError
    from attnpipe.models import hf, torch_encoder

    torch_model = SimpleNamespace(family=torch_encoder, weights=None)
    for spec, message in [("predicted", "a --torch-model has none: use --explain output-norm"),
                          ("next-token", "needs a causal language model"),
                          ("similarity:a cat", "needs a text model")]:
        with pytest.raises(AttnpipeError, match=message):
            G.build_objective(torch_model, G.parse_target(spec), lambda text: None)
    with pytest.raises(AttnpipeError, match="needs an image-classification head"):
        G.build_objective(vit_model(tiny_vit_dir), G.parse_target("predicted"))
    with pytest.raises(AttnpipeError, match="drop --method hf"):
        G.check_explainable(SimpleNamespace(family=hf))
    assert G.parse_target("output-norm").kind == "output-norm"
