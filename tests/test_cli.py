"""extract_attention.py run as a user types it: one subprocess per command line.

Every subprocess pays the torch/transformers import (several seconds), so the tests use the
tiny saved models from conftest; only the seed-001 command runs the packaged MiniLM.
Tests whose command loads a model's weights take 10-15 s each on a 2-core machine and are
marked slow; commands refused before loading take 6-9 s.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest

from attnpipe.store import open_attention
from conftest import run_script

SCRIPT = "extract_attention.py"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def extract(*args) -> subprocess.CompletedProcess:
    return run_script(SCRIPT, *args)


def assert_ok(proc) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr


def assert_one_line_error(proc, needles: list[str], output: Path) -> str:
    """A failed run: non-zero exit, one non-empty stderr line naming `needles`, no output left."""
    assert proc.returncode != 0, f"expected failure\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected exactly one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.strip(), "the error line is blank"
    for needle in needles:
        assert needle.lower() in line.lower(), f"{needle!r} not in error line: {line!r}"
    assert not output.exists(), f"{output} was written by a failed run"
    if output.parent.is_dir():
        leftovers = sorted(p.name for p in output.parent.glob(".*.tmp"))
        assert not leftovers, f"temporary files left in {output.parent}: {leftovers}"
    return line


def row_sums_ok(attention: np.ndarray, tol: float = 1e-5) -> None:
    sums = attention.sum(axis=-1)
    assert np.all(np.abs(sums - 1.0) <= tol), f"row sums off by up to {np.abs(sums - 1).max():.3g}"


# ----------------------------------------------------------------------------- 1. seed 001 (MiniLM)

SEED_TEXT = "This is an example text to analyze"


@pytest.fixture(scope="module")
def minilm_full_json(minilm_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("seed001") / "attention_data.json"
    proc = extract("--model_dir", minilm_dir, "--text", SEED_TEXT, "--output_file", out)
    assert_ok(proc)
    assert out.is_file()
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_seed001_command_writes_seed_json_format(minilm_full_json, minilm_dir):
    data = minilm_full_json
    assert {"tokens", "text", "attention_matrices"} <= set(data), sorted(data)
    assert data["text"] == SEED_TEXT

    tokens = data["tokens"]
    assert isinstance(tokens, list) and all(isinstance(t, str) for t in tokens)
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]", tokens
    assert "[PAD]" not in tokens
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    assert tokens == tok.convert_ids_to_tokens(tok(SEED_TEXT)["input_ids"])

    matrices = data["attention_matrices"]
    n = len(tokens)
    assert len(matrices) == 6
    for layer in matrices:
        assert len(layer) == 12
        for head in layer:
            assert len(head) == n
            assert all(len(row) == n for row in head)
    attention = np.asarray(matrices, dtype=np.float64)
    assert attention.shape == (6, 12, n, n)
    assert np.all(attention >= 0)
    row_sums_ok(attention)
    assert data["metadata"]["layers"] == list(range(6))
    assert data["metadata"]["heads"] == list(range(12))


@pytest.mark.slow
def test_seed001_command_one_layer_on_cpu(minilm_full_json, minilm_dir, tmp_path):
    out = tmp_path / "attention_data.json"
    proc = extract("--model_dir", minilm_dir, "--text", SEED_TEXT, "--output_file", out,
                   "--device", "cpu", "--layer", "2")
    assert_ok(proc)
    data = json.loads(out.read_text(encoding="utf-8"))
    n = len(data["tokens"])
    attention = np.asarray(data["attention_matrices"], dtype=np.float64)
    assert attention.shape == (1, 12, n, n)
    row_sums_ok(attention)
    assert data["metadata"]["layers"] == [2]
    assert data["layers"] == [2]
    assert data["tokens"] == minilm_full_json["tokens"]
    # the one stored layer is the model's layer 2, not layer 0 relabelled
    full = np.asarray(minilm_full_json["attention_matrices"], dtype=np.float64)
    np.testing.assert_allclose(attention[0], full[2], atol=1e-6)
    assert not np.allclose(attention[0], full[0], atol=1e-3)


# ----------------------------------------------------------------------------- 2. texts files -> .h5

# Texts of different lengths, short first, so length-sorted batching reorders them internally.
CORPUS = [
    ("first", "the cat sat"),
    ("second", "a big red dog ran fast on the mat and it was small"),
    ("third", "blue"),
    ("fourth", "the dog sat on the mat , and the cat ran !"),
]


def _write_txt(folder: Path) -> tuple[Path, list[str], list[str]]:
    path = folder / "texts.txt"
    lines = [CORPUS[0][1], CORPUS[1][1], "", CORPUS[2][1], "   ", CORPUS[3][1]]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path, ["line-1", "line-2", "line-4", "line-6"], [t for _, t in CORPUS]


def _write_jsonl(folder: Path) -> tuple[Path, list[str], list[str]]:
    path = folder / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in CORPUS), encoding="utf-8")
    return path, [i for i, _ in CORPUS], [t for _, t in CORPUS]


def _write_table(folder: Path, delimiter: str, suffix: str) -> tuple[Path, list[str], list[str]]:
    import csv

    path = folder / f"texts{suffix}"
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(["doc", "extra", "body"])
        for i, t in CORPUS:
            writer.writerow([f"id-{i}", "ignored", t])
    return path, [f"id-{i}" for i, _ in CORPUS], [t for _, t in CORPUS]


TEXTS_FILES = {
    "txt": (_write_txt, []),
    "jsonl": (_write_jsonl, []),
    "csv": (lambda f: _write_table(f, ",", ".csv"), ["--text-column", "body", "--id-column", "doc"]),
    "tsv": (lambda f: _write_table(f, "\t", ".tsv"), ["--text-column", "body", "--id-column", "doc"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(TEXTS_FILES))
def test_texts_file_to_h5_keeps_ids_texts_and_order(kind, tiny_model_dir, tmp_path):
    write, extra = TEXTS_FILES[kind]
    inputs = tmp_path / "in"
    inputs.mkdir()
    texts_file, ids, texts = write(inputs)
    out = tmp_path / "out" / "corpus.h5"
    out.parent.mkdir()
    proc = extract("--model_dir", tiny_model_dir("bert"), "--texts-file", texts_file, *extra,
                   "--output_file", out, "--batch-size", "2")
    assert_ok(proc)
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus.h5"]
    with open_attention(out) as f:
        assert list(f.ids) == ids
        assert f.meta.layers == (0, 1) and f.meta.heads == (0, 1, 2, 3)
        assert f.meta.model_type == "bert"
        items = list(f)
    assert [item.id for item in items] == ids
    assert [item.text for item in items] == texts
    for item in items:
        n = item.num_tokens
        # every text has one token per word plus [CLS] and [SEP] (the tiny vocabulary knows them all)
        assert n == len(item.text.split()) + 2, (item.id, item.tokens)
        assert item.tokens[0] == "[CLS]" and item.tokens[-1] == "[SEP]"
        assert "[UNK]" not in item.tokens and "[PAD]" not in item.tokens
        assert item.attention.shape == (2, 4, n, n)
        assert not item.truncated and item.num_tokens_untruncated == n
        row_sums_ok(item.attention)


# ----------------------------------------------------------------------------- 3. --layer / --heads

SELECT_TEXT = "the cat sat on the mat and the dog ran"
# ALBERT is the tiny family with 3 layers: there "0,-1" is not the same as "all".
SELECT_MODEL = "albert"


@pytest.fixture(scope="module")
def tiny_full_h5(tiny_model_dir, tmp_path_factory) -> Path:
    """All layers and heads of SELECT_TEXT, with the default flags."""
    out = tmp_path_factory.mktemp("full") / "full.h5"
    assert_ok(extract("--model_dir", tiny_model_dir(SELECT_MODEL), "--text", SELECT_TEXT, "-o", out))
    with open_attention(out) as f:
        assert f.meta.layers == (0, 1, 2) and f.meta.heads == (0, 1, 2, 3)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, layers, heads",
    [
        (["--layer", "0,-1"], (0, 2), (0, 1, 2, 3)),
        (["--layer", "all", "--heads", "all"], (0, 1, 2), (0, 1, 2, 3)),
        (["--layer", "-2", "--heads", "-1"], (1,), (3,)),
        # space-separated lists, unsorted, with a negative duplicate of a positive index
        (["--layer", "2", "0", "-3", "--heads", "3,1", "-1"], (0, 2), (1, 3)),
    ],
    ids=["layers-0,-1", "all", "layer--2-head--1", "lists-with-duplicates"],
)
def test_layer_and_head_selection(args, layers, heads, tiny_model_dir, tiny_full_h5, tmp_path):
    out = tmp_path / "sel.h5"
    assert_ok(extract("--model_dir", tiny_model_dir(SELECT_MODEL), "--text", SELECT_TEXT, "-o", out, *args))
    with open_attention(out) as f:
        assert f.meta.layers == layers
        assert f.meta.heads == heads
        assert f.meta.num_layers == 3 and f.meta.num_heads == 4
        item = f[0]
    n = item.num_tokens
    assert item.attention.shape == (len(layers), len(heads), n, n)
    with open_attention(tiny_full_h5) as full:
        reference = full[0].attention
    # the stored slices are the model's own layers/heads, in the stored order
    np.testing.assert_array_equal(item.attention, reference[np.ix_(layers, heads)])


# ----------------------------------------------------------------------------- 4. --max-length

@pytest.mark.slow
def test_max_length_truncates_flags_and_warns(tiny_model_dir, tmp_path):
    long_text = " ".join(["the cat sat on the mat"] * 3)  # 18 words -> 20 tokens
    texts_file = tmp_path / "texts.jsonl"
    texts_file.write_text(
        json.dumps({"id": "short-one", "text": "a dog"}) + "\n"
        + json.dumps({"id": "long-one", "text": long_text}) + "\n",
        encoding="utf-8",
    )
    out = tmp_path / "trunc.h5"
    proc = extract("--model_dir", tiny_model_dir("bert"), "--texts-file", texts_file, "--max-length", "8",
                   "-o", out)
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "warning" in line.lower()]
    assert len(warnings) == 1, proc.stderr
    assert "long-one" in warnings[0] and "short-one" not in warnings[0]
    with open_attention(out) as f:
        assert f.meta.max_length == 8
        short, long = f["short-one"], f["long-one"]
    assert long.truncated is True
    assert long.num_tokens == 8
    assert long.num_tokens_untruncated == 20
    assert long.tokens[0] == "[CLS]" and long.tokens[-1] == "[SEP]"
    assert long.attention.shape == (2, 4, 8, 8)
    row_sums_ok(long.attention)
    assert short.truncated is False and short.num_tokens == short.num_tokens_untruncated == 4


# ----------------------------------------------------------------------------- 5. bad input

def _no_weights_folder(tiny_model_dir, tmp_path) -> Path:
    source = tiny_model_dir("bert")
    folder = tmp_path / "no_weights"
    folder.mkdir()
    for path in source.iterdir():
        if path.suffix not in WEIGHT_SUFFIXES:
            shutil.copy(path, folder / path.name)
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    return folder


# Tiny configs of architectures attnpipe may not support, GPT-2 first (the brief's example);
# the first one missing from supported_model_types() is used, so that adding a family
# does not silently turn this into a test of a supported model.
UNSUPPORTED_CANDIDATES = {
    "gpt2": lambda T: T.GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2),
    "t5": lambda T: T.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2),
    "bart": lambda T: T.BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1,
                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                   encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32),
    "xlnet": lambda T: T.XLNetConfig(vocab_size=64, d_model=16, n_layer=1, n_head=2, d_inner=32),
}


def _unsupported_folder(tmp_path) -> tuple[Path, str]:
    import transformers as T

    from attnpipe.models import supported_model_types

    supported = set(supported_model_types())
    for model_type, make_config in UNSUPPORTED_CANDIDATES.items():
        if model_type not in supported:
            break
    else:
        pytest.fail(f"every candidate architecture is supported now: {sorted(UNSUPPORTED_CANDIDATES)}")
    config = make_config(T)
    assert config.model_type == model_type
    folder = tmp_path / f"{model_type}_model"
    T.AutoModel.from_config(config).save_pretrained(folder)
    return folder, model_type


def _case_args(case: str, tiny_model_dir, tmp_path: Path, out: Path):
    """(argv, output path, needles) for one bad command line."""
    bert = tiny_model_dir("bert")
    inputs = tmp_path / "in"
    inputs.mkdir()
    if case == "model folder missing":
        missing = tmp_path / "no_such_model"
        return ["--model_dir", missing, "--text", "the cat", "-o", out], out, ["not found", "no_such_model"]
    if case == "no weight files":
        folder = _no_weights_folder(tiny_model_dir, tmp_path)
        return ["--model_dir", folder, "--text", "the cat", "-o", out], out, ["no weight files", "no_weights"]
    if case == "unsupported architecture":
        from attnpipe.models import supported_model_types

        folder, model_type = _unsupported_folder(tmp_path)
        return (["--model_dir", folder, "--text", "the cat", "-o", out], out,
                ["unsupported", repr(model_type), "bert", "distilbert", *supported_model_types()])
    if case == "empty --text":
        return ["--model_dir", bert, "--text", "", "-o", out], out, ["--text", "empty"]
    if case == "empty texts file":
        path = inputs / "empty.txt"
        path.write_bytes(b"")
        return ["--model_dir", bert, "--texts-file", path, "-o", out], out, ["empty.txt", "no texts"]
    if case == "binary texts file":
        path = inputs / "blob.txt"
        path.write_bytes(b"the cat\n\x00\x01\x02\x03 sat\n")
        return ["--model_dir", bert, "--texts-file", path, "-o", out], out, ["blob.txt", "binary"]
    if case == "invalid utf-8 on line 3":
        path = inputs / "latin1.txt"
        path.write_bytes(b"the cat\na dog\nthe caf\xe9 sat\nit ran\n")
        return ["--model_dir", bert, "--texts-file", path, "-o", out], out, ["latin1.txt", "line 3", "utf-8"]
    if case == "--layer 7":
        return (["--model_dir", bert, "--text", "the cat", "--layer", "7", "-o", out], out,
                ["--layer", "7", "out of range", "2 layers", "0 to 1"])
    if case == "--heads 9":
        return (["--model_dir", bert, "--text", "the cat", "--heads", "9", "-o", out], out,
                ["--heads", "9", "out of range", "4 heads", "0 to 3"])
    if case == "unknown output suffix":
        target = out.with_suffix(".xyz")
        return ["--model_dir", bert, "--text", "the cat", "-o", target], target, [".xyz"]
    if case == "output folder under a file":  # a missing folder is made (test_output_folders_are_made)
        (tmp_path / "a_file").write_text("x")
        target = tmp_path / "a_file" / "no_such_folder" / "out.h5"
        return (["--model_dir", bert, "--text", "the cat", "-o", target], target,
                ["cannot be made", "a_file is a file"])
    if case == "output folder not writable":
        out.parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
        if os.access(out.parent, os.W_OK):
            out.parent.chmod(0o755)
            pytest.skip("running as root: chmod does not make the folder unwritable")
        return ["--model_dir", bert, "--text", "the cat", "-o", out], out, ["not writable", str(out.parent)]
    if case == "two texts to .json":
        target = out.with_suffix(".json")
        return (["--model_dir", bert, "--text", "the cat", "--text", "a dog", "-o", target], target,
                [".json", "one text", "2", ".h5"])
    raise AssertionError(case)


BAD_CASES = [
    "model folder missing",
    "no weight files",
    "unsupported architecture",
    "empty --text",
    "empty texts file",
    "binary texts file",
    "invalid utf-8 on line 3",
    pytest.param("--layer 7", marks=pytest.mark.slow),  # these two load the model first
    pytest.param("--heads 9", marks=pytest.mark.slow),
    "unknown output suffix",
    "output folder under a file",
    "output folder not writable",
    "two texts to .json",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model_dir, tmp_path):
    out = tmp_path / "out" / "attention.h5"
    out.parent.mkdir()
    try:
        argv, target, needles = _case_args(case, tiny_model_dir, tmp_path, out)
        proc = extract(*argv)
        assert_one_line_error(proc, needles, target)
        assert proc.stderr.startswith("error: ")
        if target.parent == out.parent:
            assert list(out.parent.iterdir()) == [], "the output folder should stay empty"
    finally:
        out.parent.chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize(
    "suffix, args",
    [
        (".h5", ["--layer", "99"]),  # fails before anything is written
        (".h5", ["--verify", "--verify-tol", "-1"]),  # fails mid-run, with the HDF5 temp file open
        (".json", ["--verify", "--verify-tol", "-1"]),
    ],
    ids=["h5-layer-99", "h5-fails-while-writing", "json-fails-while-writing"],
)
def test_failed_run_leaves_existing_output_untouched(suffix, args, tiny_model_dir, tmp_path):
    out = tmp_path / f"attention{suffix}"
    previous = b"previous results: must survive a failed run\n\x00\x01\x02"
    out.write_bytes(previous)
    proc = extract("--model_dir", tiny_model_dir("bert"), "--text", "the cat sat", "-o", out, *args)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert out.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


# ----------------------------------------------------------------------------- 6. --help

def test_help_mentions_main_options():
    proc = extract("--help")
    assert proc.returncode == 0, proc.stderr
    assert "--texts-file" in proc.stdout
    assert "--model_dir" in proc.stdout
    assert "--output_file" in proc.stdout


def test_unwritable_output_folder_is_refused_even_as_root(tiny_model_dir, tmp_path, capsys, monkeypatch):
    """Root ignores permission bits (the subprocess case above skips), so deny access through os.access."""
    import extract_attention

    import attnpipe.store.atomic as atomic
    from attnpipe.errors import run_cli

    monkeypatch.setattr(atomic.os, "access", lambda path, mode: False)
    out = tmp_path / "out.h5"
    argv = ["--model_dir", str(tiny_model_dir("bert")), "--text", "the cat", "-o", str(out)]
    capsys.readouterr()  # drop what building the tiny model printed
    assert run_cli(extract_attention.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "not writable" in err
    assert list(tmp_path.iterdir()) == []
