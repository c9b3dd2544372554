"""Runtime guards: a forward pass that breaks the attention contract stops the run, naming where.

Each test breaks one family's pass by monkeypatching the function it calls (like
test_parity.py's --verify test), or poisons a checkpoint's weight on disk (one per input kind),
runs the real extraction and expects one clear error and no file.
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

import extract_attention
from attnpipe.errors import run_cli
from attnpipe.extract import runner as extraction
from attnpipe.extract import guards
from attnpipe.extract.background import WriterPlan
from attnpipe.extract.corpus import Text
from attnpipe.errors import AttnpipeError
from attnpipe.models import bert, gpt2
from conftest import write_test_images

# Different lengths, so the batch is padded and padded keys exist.
TEXTS = (Text("long-one", "the cat sat on the mat and it was red"), Text("short", "a dog"))


@pytest.fixture(params=["deferred", "overlapped"])
def writer_mode(request, monkeypatch):
    """Both ways the runner shares the machine with its writer (background.writer_plan): the
    guards run in the main thread (deferred) or, for each batch layer, in the writer thread."""
    plan = WriterPlan(deferred=request.param == "deferred", encode_threads=2)
    monkeypatch.setattr(extraction, "writer_plan", lambda *args: plan)
    return request.param


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


def test_nan_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, writer_mode):
    real = bert.attention_probs

    def nan_in_head_2(q, k, scale, mask=None):
        probs = real(q, k, scale, mask).clone()
        probs[:, 2, 1, 0] = float("nan")
        return probs

    monkeypatch.setattr(bert, "attention_probs", nan_in_head_2)
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"NaN or infinite at text '(long-one|short)' layer 0 head 2 query 1")


def test_infinity_stops_the_run(tiny_model_dir, tmp_path, monkeypatch, writer_mode):
    real = bert.attention_probs

    def inf_in_head_3(q, k, scale, mask=None):
        probs = real(q, k, scale, mask).clone()
        probs[1, 3, 0, 0] = float("inf")  # batch row 1 is the shorter text (longest first)
        return probs

    monkeypatch.setattr(bert, "attention_probs", inf_in_head_3)
    expect_stop(tiny_model_dir("bert"), tmp_path, r"NaN or infinite at text 'short' layer 0 head 3 query 0")


def test_rows_not_summing_to_one_stop_the_run(tiny_model_dir, tmp_path, monkeypatch, writer_mode):
    real = bert.attention_probs
    monkeypatch.setattr(bert, "attention_probs", lambda q, k, scale, mask=None: real(q, k, scale, mask) * 1.001)
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"rows do not sum to 1 at text 'long-one' layer 0 head 0 query 0: off by up to 0\.001")


def test_padded_keys_seen_stop_the_run(tiny_model_dir, tmp_path, monkeypatch, writer_mode):
    # No padding mask: the short text's queries spread weight onto padded keys.
    monkeypatch.setattr(bert, "padding_mask", lambda mask, dtype: torch.zeros(mask.shape[0], 1, 1, mask.shape[1]))
    expect_stop(tiny_model_dir("bert"), tmp_path,
                r"a padded key gets non-zero attention at text 'short' layer 0 head 0 query 0 key 4")


def test_future_keys_seen_stop_the_run(tiny_model_dir, tmp_path, monkeypatch, writer_mode):
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


# ----------------------------------------------------------------------------- every input kind
# One broken model per input kind, broken the same way: a query projection poisoned with NaN in
# the checkpoint on disk, so every family (and --method hf, and --explain) computes NaN attention
# from its own weights. The run must stop with the guard's one line naming text, layer and head,
# and leave nothing in the output folder.


def poisoned(folder, tmp_path, key_part: str):
    """A copy of a model folder whose first weight named like `key_part` is NaN."""
    from safetensors.torch import load_file, save_file

    copy = tmp_path / f"poisoned-{folder.name}"
    shutil.copytree(folder, copy)
    state = load_file(copy / "model.safetensors")
    key = next(k for k in state if key_part in k and k.endswith("weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def guard_stops(capsys, out_dir, pattern: str, *argv) -> None:
    out_dir.mkdir(exist_ok=True)
    capsys.readouterr()
    code = run_cli(extract_attention.main, [str(a) for a in argv])
    lines = capsys.readouterr().err.splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert re.search(pattern, lines[0]), lines[0]
    assert list(out_dir.iterdir()) == [], "a stopped run must leave nothing"


NAN = r"^error: attention is NaN or infinite at text '{text}' {kind}layer 0 head 0 query 0: the forward pass is broken$"


def test_texts_with_a_poisoned_weight_stop(tiny_model_dir, tmp_path, capsys, writer_mode):
    model = poisoned(tiny_model_dir("bert"), tmp_path, "layer.0.attention.self.query")
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="text-0", kind=""), "--model_dir", model, "--text", "the cat sat",
                "--text", "a dog", "-o", out / "a.h5", "-q")


def test_method_hf_with_a_poisoned_weight_stops(tiny_model_dir, tmp_path, capsys):
    model = poisoned(tiny_model_dir("bert"), tmp_path, "layer.0.attention.self.query")
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="text-0", kind=""), "--model_dir", model, "--method", "hf",
                "--text", "the cat sat", "-o", out / "a.json", "-q")


def test_explain_with_a_poisoned_weight_stops(tiny_model_dir, tmp_path, capsys):
    model = poisoned(tiny_model_dir("bert"), tmp_path, "layer.0.attention.self.query")
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="text-0", kind=""), "--model_dir", model, "--text", "the cat sat",
                "--explain", "similarity:a dog", "-o", out / "a.h5", "-q")


def test_pairs_with_poisoned_cross_attention_stop(tmp_path, capsys):
    from seq2seq_tiny import save_tiny_seq2seq

    model = poisoned(save_tiny_seq2seq("marian", tmp_path / "marian"), tmp_path, "decoder.layers.0.encoder_attn.q_proj")
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="pair-0", kind="cross-attention "), "--model_dir", model,
                "--source", "the cat sat on the mat", "--target", "a cat sat", "-o", out / "a.h5", "-q")


def test_images_with_a_poisoned_weight_stop(tiny_vit_dir, tmp_path, capsys):
    model = poisoned(tiny_vit_dir, tmp_path, "layer.0.attention.attention.query")
    images = write_test_images(tmp_path / "images")
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="img0.png", kind=""), "--model_dir", model,
                "--image", images[0], "--image", images[1], "-o", out / "a.h5", "-q")


TORCH_MODULE = '''
from torch import nn

def build():
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
'''


def test_embeddings_with_a_poisoned_weight_stop(tmp_path, capsys):
    from safetensors.torch import save_file

    factory = tmp_path / "user_model.py"
    factory.write_text(TORCH_MODULE)
    namespace: dict = {}
    exec(TORCH_MODULE, namespace)  # the same module the CLI builds from the file
    state = namespace["build"]().state_dict()
    state["layers.0.self_attn.in_proj_weight"][:8] = float("nan")  # the query rows of layer 0
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).standard_normal((2, 5, 8)).astype(np.float32))
    out = tmp_path / "out"
    guard_stops(capsys, out, NAN.format(text="sample-0", kind=""), "--torch-model", f"{factory}:build",
                "--weights", tmp_path / "w.safetensors", "--data", tmp_path / "x.npy", "-o", out / "a.h5", "-q")


def test_cross_attention_guard_unit_cases():
    """Cross-attention: 2 target rows over 3 source keys; a padded source key must get 0."""
    probs = torch.tensor([[[[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]]]])  # (1, 1, Q=2, K=3), key 2 is padding
    guards.check_attention({0: probs}, [2], ["p"], causal=False, key_lengths=[2], kind="cross")
    leaking = torch.tensor([[[[0.5, 0.4, 0.1], [0.2, 0.8, 0.0]]]])
    with pytest.raises(AttnpipeError, match=r"padded key .* text 'p' cross-attention layer 0 head 0 query 0 key 2"):
        guards.check_attention({0: leaking}, [2], ["p"], causal=False, key_lengths=[2], kind="cross")
