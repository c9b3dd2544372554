"""Generation: the model writes the text, then our pass runs on it (attnpipe/extract/generate.py).

For tiny T5, BART, Marian, GPT-2 and Llama checkpoints (greedy, beam search and seeded sampling):
the stored token ids are exactly what `model.generate` returns with the same settings, called
on each input alone, and every stored head equals transformers' eager attention on the generated
sequence. Then the file's `generated` flags and generation provenance (HDF5 and JSON), the
figures' prompt/continuation boundary as drawn pixels, seed 003's figures of a generated
translation, and the flag in the viewer page's data.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import jsonschema
import numpy as np
import pytest
import torch

import extract_attention
import visualize_attention
from attnpipe.errors import run_cli
from attnpipe.store import open_attention
from conftest import ROOT, save_tiny_model, tiny_config
from seq2seq_tiny import save_tiny_seq2seq

SOURCES = ["the cat sat on the mat", "a dog ran"]
NEW_TOKENS = 5
# Our pass against transformers eager on the same float32 inputs: float32 rounding only (the
# runner's --verify default, measured at 0 to ~1e-7 on these models).
PARITY_TOL = 1e-5


def save_tiny_causal_lm(model_type: str, folder: Path) -> Path:
    """conftest's tiny model and tokenizer, with the ...ForCausalLM weights (an untied LM head)."""
    import transformers as T

    save_tiny_model(model_type, folder)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(tiny_config(model_type)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    cache: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in cache:
            folder = tmp_path_factory.mktemp(variant)
            cache[variant] = (save_tiny_causal_lm(variant, folder) if variant in ("gpt2", "llama")
                              else save_tiny_seq2seq(variant, folder, lm_head=True))
        return cache[variant]

    return make


def extract(capsys, *argv) -> str:
    status = run_cli(extract_attention.main, [str(a) for a in argv])
    err = capsys.readouterr().err
    assert status == 0, err
    return err


def reference_generate(lm, input_ids: list[int], settings: dict) -> list[int]:
    """What a user gets from transformers' `lm.generate` for one input with the same settings."""
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache

    kwargs = dict(max_new_tokens=settings["max_new_tokens"], num_beams=settings["num_beams"],
                  do_sample=settings["do_sample"])
    if lm.generation_config.pad_token_id is None:
        kwargs["pad_token_id"] = lm.generation_config.eos_token_id
    if getattr(lm.config, "num_decoder_layers", lm.config.num_hidden_layers) != lm.config.num_hidden_layers:
        # tiny T5's decoder is deeper than its encoder, which transformers' default cache cannot hold
        kwargs["past_key_values"] = EncoderDecoderCache(DynamicCache(), DynamicCache())
    if settings["do_sample"]:
        torch.manual_seed(settings["seed"])
    ids = torch.tensor([input_ids])
    with torch.no_grad():
        return lm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)[0].tolist()


def eager_attention(hf, item, causal: bool) -> dict[str, tuple]:
    """transformers' eager attention on the stored (generated) sequence, per kind: (layer, head, q, k)."""
    with torch.no_grad():
        if causal:
            out = hf(input_ids=torch.tensor(item.token_ids[None]), output_attentions=True)
            return {"self": out.attentions}
        out = hf(input_ids=torch.tensor(item.token_ids[None]),
                 decoder_input_ids=torch.tensor(item.target.token_ids[None]), output_attentions=True)
    return {"self": out.encoder_attentions, "decoder": out.decoder_attentions, "cross": out.cross_attentions}


CASES = [  # variant, causal, extra flags, settings they mean
    ("t5", False, [], dict(num_beams=1, do_sample=False)),
    ("bart", False, ["--num-beams", "3"], dict(num_beams=3, do_sample=False)),
    ("marian", False, [], dict(num_beams=1, do_sample=False)),
    ("gpt2", True, [], dict(num_beams=1, do_sample=False)),
    ("gpt2", True, ["--sample", "--seed", "7"], dict(num_beams=1, do_sample=True, seed=7)),
    ("llama", True, ["--num-beams", "2"], dict(num_beams=2, do_sample=False)),
]


@pytest.mark.parametrize("variant,causal,flags,settings", CASES,
                         ids=["t5-greedy", "bart-beams", "marian-greedy", "gpt2-greedy", "gpt2-sample", "llama-beams"])
def test_generated_ids_equal_generate_and_attention_equals_eager(variant, causal, flags, settings, lm_dir,
                                                                 tmp_path, capsys):
    model_dir, out = lm_dir(variant), tmp_path / "gen.h5"
    inputs = [a for s in SOURCES for a in (("--text", s) if causal else ("--source", s))]
    length = ["--generate", NEW_TOKENS] if causal else ["--max-new-tokens", NEW_TOKENS]
    extract(capsys, "--model_dir", model_dir, *inputs, *length, *flags, "--verify", "-q", "-o", out)
    settings = dict(settings, max_new_tokens=NEW_TOKENS)
    with open_attention(out) as f:
        meta = f.meta
        assert meta.generation["kind"] == ("continuation" if causal else "target")
        assert {k: meta.generation[k] for k in settings} == settings
        assert meta.parity_max_abs_diff <= PARITY_TOL
        items = list(f)
    import transformers as T

    tokenizer = T.AutoTokenizer.from_pretrained(model_dir)
    auto = T.AutoModelForCausalLM if causal else T.AutoModelForSeq2SeqLM
    lm = auto.from_pretrained(model_dir, attn_implementation="eager").eval()
    hf = T.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    for source, item in zip(SOURCES, items):
        prompt = tokenizer(source)["input_ids"]
        expected = reference_generate(lm, prompt, settings)
        if causal:
            assert item.token_ids.tolist() == expected  # prompt + continuation, exactly
            assert item.generated.tolist() == [False] * len(prompt) + [True] * (len(expected) - len(prompt))
            assert item.text == source and item.generated_text == tokenizer.decode(expected[len(prompt):],
                                                                                   skip_special_tokens=True)
            assert (item.offsets[len(prompt):] == -1).all()
        else:
            # generate returns start token + target; the decoder input is that minus its last token
            assert item.target.label_ids.tolist() == expected[1:]
            assert item.target.token_ids.tolist() == expected[:-1]
            assert item.target.generated.tolist() == [False] + [True] * (len(expected) - 2)
            assert item.token_ids.tolist() == prompt and item.generated is None
        reference = eager_attention(hf, item, causal)
        stored = {"self": (item.attention, meta.layers, meta.heads)}
        if not causal:
            stored["decoder"] = (item.target.decoder_attention, meta.decoder_layers, meta.decoder_heads)
            stored["cross"] = (item.target.cross_attention, meta.decoder_layers, meta.decoder_heads)
        for kind, (attention, layers, heads) in stored.items():
            for li, layer in enumerate(layers):
                ours, theirs = attention[li], reference[kind][layer][0, list(heads)].numpy()
                assert ours.shape == theirs.shape
                np.testing.assert_allclose(ours, theirs, atol=PARITY_TOL, rtol=0, err_msg=f"{kind} layer {layer}")


def test_generated_flags_round_trip_and_old_files_read(lm_dir, tmp_path, capsys):
    model_dir = lm_dir("gpt2")
    h5_out, json_out, plain = tmp_path / "g.h5", tmp_path / "g.json", tmp_path / "plain.json"
    extract(capsys, "--model_dir", model_dir, "--text", "the cat", "--generate", 3, "-q", "-o", h5_out,
            "--schema-version", 2)  # read below by version 2's path
    extract(capsys, "--model_dir", model_dir, "--text", "the cat", "--generate", 3, "-q", "-o", json_out)
    extract(capsys, "--model_dir", model_dir, "--text", "the cat", "-q", "-o", plain)
    packed = tmp_path / "g3.h5"  # schema version 3 carries the same fields
    extract(capsys, "--model_dir", model_dir, "--text", "the cat", "--generate", 3, "-q", "-o", packed,
            "--schema-version", 3)
    for path in (h5_out, packed):
        with open_attention(path) as a, open_attention(json_out) as b:
            assert a.meta.generation == b.meta.generation
            x, y = a[0], b[0]
            assert x.generated.tolist() == y.generated.tolist() == [False] * 4 + [True] * 3
            assert x.generated_text == y.generated_text and x.tokens == y.tokens
    with h5py.File(h5_out, "r") as f:  # plain h5py: what docs/FORMAT.md says
        assert f["texts/00000000/generated"].dtype == bool
        assert json.loads(f.attrs["generation"])["strategy"] == "greedy"
    with h5py.File(packed, "r") as f:  # version 3: one packed field
        assert f["generated/values"].dtype == bool and f["generated/values"][()].tolist() == [False] * 4 + [True] * 3
        assert json.loads(f.attrs["generation"])["strategy"] == "greedy"
    data = json.loads(json_out.read_text())
    assert data["generated"] == [False] * 4 + [True] * 3 and data["metadata"]["generation"]["max_new_tokens"] == 3
    with open_attention(plain) as f:  # a file without generation (and every older file): no flags
        assert f[0].generated is None and f[0].generated_text is None and f.meta.generation is None
    data["generated"] = [True]  # one flag for seven tokens: refused when read
    json_out.write_text(json.dumps(data))
    assert run_cli(visualize_attention.main, ["-i", str(json_out), "-o", str(tmp_path / "x.png")]) == 2
    assert "1 generated for 7 tokens" in capsys.readouterr().err


def red_pixels(path: Path) -> int:
    from PIL import Image

    rgb = np.asarray(Image.open(path).convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_figures_show_the_boundary_and_seed003_figures_of_a_generated_translation(lm_dir, tmp_path, capsys):
    gen, plain = tmp_path / "gen.json", tmp_path / "plain.json"
    extract(capsys, "--model_dir", lm_dir("gpt2"), "--text", "the cat sat", "--generate", 4, "-q", "-o", gen)
    extract(capsys, "--model_dir", lm_dir("gpt2"), "--text", "the cat sat", "-q", "-o", plain)
    for source in (gen, plain):
        for mode in ("plot", "heads"):
            status = run_cli(visualize_attention.main, ["-i", str(source), "--mode", mode, "--layer", "0",
                                                        "-o", str(tmp_path / f"{source.stem}_{mode}.png")])
            assert status == 0, capsys.readouterr().err
    # The boundary line and the generated labels are drawn in red, which viridis does not have.
    assert red_pixels(tmp_path / "gen_plot.png") > 200 and red_pixels(tmp_path / "gen_heads.png") > 200
    assert red_pixels(tmp_path / "plain_plot.png") == 0 and red_pixels(tmp_path / "plain_heads.png") == 0
    # A token window: the flags are those of the shown tokens (prompt-only window: nothing red).
    for window, red in (("3:", True), (":4", False)):
        out = tmp_path / f"window{window.strip(':')}.png"
        assert run_cli(visualize_attention.main, ["-i", str(gen), "--mode", "plot", "--layer", "0",
                                                  "--tokens-range", window, "-o", str(out)]) == 0
        assert (red_pixels(out) > 100) == red, window
    svg = tmp_path / "gen.svg"
    assert run_cli(visualize_attention.main, ["-i", str(gen), "--mode", "plot", "-o", str(svg)]) == 0
    assert "generated tokens" in svg.read_text()

    prepared = tmp_path / "prepared.json"
    assert run_cli(visualize_attention.main, ["-i", str(gen), "--mode", "prepare", "-o", str(prepared)]) == 0
    payload = json.loads(prepared.read_text())
    assert payload["generated"] == [False] * 5 + [True] * 4
    jsonschema.validate(payload, json.loads((ROOT / "docs" / "prepared.schema.json").read_text()))
    page = tmp_path / "page.html"
    assert run_cli(visualize_attention.main, ["-i", str(gen), "--mode", "html", "-o", str(page)]) == 0
    assert '"generated":[false,false,false,false,false,true,true,true,true]' in page.read_text()

    # Seed 003: the source alone (--input), the model translates, three figures of the last decoder layer.
    pair, figs = tmp_path / "translation.json", tmp_path / "plots"
    figs.mkdir()
    extract(capsys, "--model_dir", lm_dir("marian"), "--input", "the cat sat on the mat", "--max-new-tokens", 4,
            "-q", "-o", pair)
    assert run_cli(visualize_attention.main, ["-i", str(pair), "--mode", "seq2seq", "--output-dir", str(figs),
                                              "--format", "svg"]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in figs.iterdir())
    assert names == ["cross_attention_layer2.svg", "cross_attention_multihead_layer2.svg", "self_attention_layer2.svg"]
    assert all("generated target (greedy)" in (figs / name).read_text() for name in names)


def test_seed003_file_of_sentences_and_num_examples(lm_dir, tmp_path, capsys):
    sentences, out = tmp_path / "examples.txt", tmp_path / "t.h5"
    sentences.write_text("the cat sat\na dog ran\nit was big\n", encoding="utf-8")
    extract(capsys, "--model_dir", lm_dir("t5"), "--file", sentences, "--num-examples", 2, "--max-new-tokens", 3,
            "-q", "-o", out)
    with open_attention(out) as f:
        assert f.ids == ("line-1", "line-2")
        assert all(item.target.generated is not None and len(item.target.label_ids) <= 3 for item in f)
    pairs = tmp_path / "sources.jsonl"  # a pairs file without targets: generated too
    pairs.write_text('{"id": "s1", "source": "the cat"}\n{"id": "s2", "source": "a dog"}\n', encoding="utf-8")
    extract(capsys, "--model_dir", lm_dir("t5"), "--texts-file", pairs, "--max-new-tokens", 2, "-q", "-o", out)
    with open_attention(out) as f:
        assert f.ids == ("s1", "s2") and f.meta.generation["max_new_tokens"] == 2


def test_untied_base_model_folder_is_refused(tiny_model_dir, tmp_path, capsys):
    """A Llama folder of the base model only: generate would use a random LM head; refused.
    (The other refusals of generation are rows 108-123 of docs/ERRORS.md, run by its test.)"""
    out = tmp_path / "a.h5"
    status = run_cli(extract_attention.main, ["--model_dir", str(tiny_model_dir("llama")), "--text", "the cat",
                                              "--generate", "2", "-o", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and "LM head" in err and "ForCausalLM" in err and not out.exists()
