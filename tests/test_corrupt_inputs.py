"""Damaged or foreign attention files given to stage 2 (visualize_attention.py, analyze_attention.py).

Each case takes a valid file, breaks one thing, and runs both scripts' main() the way their
`__main__` does (attnpipe.errors.run_cli): one `error:` line naming the problem, exit status 2,
no traceback, and no figure or table written. Two cases also run as real subprocesses.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

import analyze_attention
import visualize_attention
from attnpipe.errors import run_cli
from attnpipe.store import H5Writer, Provenance, TextAttention, write_json
from conftest import run_script

META = Provenance(
    model="/models/tiny", model_type="bert", weights_sha256="0" * 64, weight_files=("model.safetensors",),
    num_layers=2, num_heads=3, layers=(0, 1), heads=(0, 1, 2), dtype="float32", compute_dtype="float32",
    method="manual", max_length=16, trust_remote_code=False, library_versions={"attnpipe": "test"},
)


def valid_item(text_id: str, n: int, seed: int) -> TextAttention:
    logits = np.random.default_rng(seed).normal(size=(2, 3, n, n)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # (layer, head, query, key)
    tokens = tuple(["[CLS]"] + [f"w{i}" for i in range(n - 2)] + ["[SEP]"])
    return TextAttention(
        id=text_id, text=" ".join(tokens[1:-1]), tokens=tokens, token_ids=np.arange(n),
        special_tokens_mask=np.array([True] + [False] * (n - 2) + [True]), offsets=np.zeros((n, 2), np.int64),
        word_ids=np.array([-1] + list(range(n - 2)) + [-1]), truncated=False, num_tokens_untruncated=n,
        attention=probs.astype(np.float32),
    )


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("valid")
    items = [valid_item("a", 4, 0), valid_item("b", 6, 1)]
    with H5Writer(folder / "good.h5", len(items), "float32") as writer:
        for index, item in enumerate(items):
            writer.write(index, item)
        writer.finish(META)
    write_json(folder / "good.json", items[1], META)
    return {".h5": folder / "good.h5", ".json": folder / "good.json"}


# ----------------------------------------------------------------------------- how each file is broken


def h5_edit(edit: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            edit(f)
    return apply


def json_edit(edit: Callable[[dict], object]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = json.loads(path.read_text(encoding="utf-8"))
        result = edit(data)
        path.write_text(json.dumps(data if result is None else result), encoding="utf-8")
    return apply


def replace_attention(f: h5py.File, change: Callable[[np.ndarray], np.ndarray], text: str = "00000000") -> None:
    attention = f[f"texts/{text}/attention"][()]
    del f[f"texts/{text}/attention"]
    f[f"texts/{text}"].create_dataset("attention", data=change(attention))


def with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[1, 2, 3, 0] = np.nan
    return a


def rows_scaled(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[0, 1] *= 0.9  # layer 0 head 1: every row sums to 0.9
    return a


def negative(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a[1, 0, 2, :2] += np.array([-0.5, 0.5], dtype=a.dtype)  # still sums to 1, but one weight < 0
    return a


def truncate(keep: float) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * keep)])
    return apply


def ragged(data: dict) -> None:
    data["attention_matrices"][1][2] = data["attention_matrices"][1][2][:-1]  # one head lacks a row


def json_nan(path: Path) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["attention_matrices"][0][0][0][0] = float("nan")
    path.write_text(json.dumps(data), encoding="utf-8")  # Python writes the non-standard NaN literal


def json_rows_scaled(data: dict) -> None:
    data["attention_matrices"][1][0] = [[2 * v for v in row] for row in data["attention_matrices"][1][0]]


def set_attr(key: str, value) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        f.attrs[key] = value
    return edit


def delete(path_in_file: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f[path_in_file]
    return edit


def del_attr(key: str) -> Callable[[h5py.File], None]:
    def edit(f: h5py.File) -> None:
        del f.attrs[key]
    return edit


def foreign_h5(path: Path) -> None:
    path.unlink()
    with h5py.File(path, "w") as f:
        f["data"] = np.ones((3, 3))
        f.attrs["creator"] = "some other tool"


def fewer_tokens(f: h5py.File) -> None:
    tokens = f["texts/00000000/tokens"].asstr()[()]
    del f["texts/00000000/tokens"]
    f["texts/00000000"].create_dataset("tokens", data=list(tokens[:-1]), dtype=h5py.string_dtype())


def write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(data)


# (name, suffix of the valid file to start from, how to break it, words the error line must hold)
CASES = [
    ("h5-truncated-half", ".h5", truncate(0.5), ["not a readable HDF5 file"]),
    ("h5-truncated-tail", ".h5", truncate(0.97), ["not a readable HDF5 file"]),
    ("h5-empty-file", ".h5", write_bytes(b""), ["not a readable HDF5 file"]),
    ("h5-garbage-bytes", ".h5", write_bytes(b"\x89HDF\r\n" + bytes(range(256)) * 8), ["not a readable HDF5 file"]),
    ("h5-from-another-tool", ".h5", foreign_h5, ["not an attnpipe attention file"]),
    ("h5-future-schema", ".h5", h5_edit(set_attr("schema_version", 99)), ["schema version 99"]),
    ("h5-schema-zero", ".h5", h5_edit(set_attr("schema_version", 0)), ["schema version 0"]),
    ("h5-no-schema-version", ".h5", h5_edit(del_attr("schema_version")), ["schema version -1"]),
    ("h5-no-ids", ".h5", h5_edit(delete("ids")), ["damaged attention file: it lacks ids"]),
    ("h5-no-provenance", ".h5", h5_edit(del_attr("model_type")), ["damaged attention file: it lacks model_type"]),
    ("h5-text-missing", ".h5", h5_edit(delete("texts/00000001")), ["it lists 2 ids but holds 1 texts"]),
    ("h5-no-tokens", ".h5", h5_edit(delete("texts/00000000/tokens")), ["text 0 is damaged: it lacks tokens"]),
    ("h5-no-id-attr", ".h5", h5_edit(lambda f: f["texts/00000000"].attrs.__delitem__("id")),
     ["text 0 is damaged: it lacks id"]),
    ("h5-fewer-tokens", ".h5", h5_edit(fewer_tokens), ["text 'a' has attention of shape (2, 3, 4, 4)",
                                                        "expected (2, 3, 3, 3)"]),
    ("h5-nan", ".h5", h5_edit(lambda f: replace_attention(f, with_nan)),
     ["NaN or infinite", "text 'a' layer 1 head 2 query 3"]),
    ("h5-rows-not-one", ".h5", h5_edit(lambda f: replace_attention(f, rows_scaled)),
     ["rows do not sum to 1", "text 'a' layer 0 head 1 query 0", "tolerance 0.0001"]),
    ("h5-negative", ".h5", h5_edit(lambda f: replace_attention(f, negative)),
     ["negative", "text 'a' layer 1 head 0 query 2"]),
    ("h5-bad-dtype", ".h5", h5_edit(set_attr("dtype", "int8")), ["unknown storage dtype 'int8'"]),
    ("json-truncated", ".json", truncate(0.5), ["is not valid JSON"]),
    ("json-empty-file", ".json", write_bytes(b""), ["is not valid JSON"]),
    ("json-not-an-object", ".json", json_edit(lambda d: [d]), ["not an attention file"]),
    ("json-no-matrices", ".json", json_edit(lambda d: d.pop("attention_matrices") and None),
     ["lacks the key(s) attention_matrices"]),
    ("json-no-tokens-no-text", ".json", json_edit(lambda d: (d.pop("tokens"), d.pop("text")) and None),
     ["lacks the key(s) tokens, text"]),
    ("json-tokens-not-strings", ".json", json_edit(lambda d: d.update(tokens=[1] * len(d["tokens"]))),
     ["'tokens' must be a list of strings"]),
    ("json-ragged", ".json", json_edit(ragged), ["attention_matrices is ragged"]),
    ("json-nan", ".json", json_nan, ["NaN or infinite", "layer 0 head 0 query 0"]),
    ("json-rows-not-one", ".json", json_edit(json_rows_scaled), ["rows do not sum to 1", "layer 1 head 0"]),
    ("json-wrong-size", ".json", json_edit(lambda d: d["tokens"].pop() and None),
     ["attention_matrices has shape (2, 3, 6, 6)", "for 5 tokens"]),
    ("json-future-schema", ".json", json_edit(lambda d: d["metadata"].update(schema_version=7)),
     ["schema version 7"]),
    ("json-metadata-missing-key", ".json", json_edit(lambda d: d["metadata"].pop("heads") and None),
     ["damaged metadata", "heads"]),
    ("json-metadata-unknown-key", ".json", json_edit(lambda d: d["metadata"].update(colour="red")),
     ["damaged metadata", "colour"]),
    ("json-metadata-not-object", ".json", json_edit(lambda d: d.update(metadata=[1, 2])),
     ["'metadata' must be an object"]),
    ("json-layers-disagree", ".json", json_edit(lambda d: d["metadata"].update(layers=[0])),
     ["expected (1, 3, 6, 6)"]),
]
LEDGER = {"bad_inputs": 0}


def run_main(main, argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = run_cli(main, argv)
    except SystemExit as stop:  # argparse refuses before main runs
        code = stop.code
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, needles: list[str]) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"


@pytest.mark.parametrize("name, suffix, breakage, needles", CASES, ids=[c[0] for c in CASES])
def test_damaged_file_gives_one_clear_error_in_both_scripts(valid, tmp_path, capsys, name, suffix, breakage,
                                                            needles):
    path = tmp_path / f"broken{suffix}"
    shutil.copy(valid[suffix], path)
    breakage(path)
    figure = tmp_path / "figure.png"
    code, err = run_main(visualize_attention.main, ["--input_file", str(path), "--output_file", str(figure)],
                         capsys)
    assert_one_error(code, err, needles)
    assert not figure.exists()
    out = tmp_path / "metrics"
    code, err = run_main(analyze_attention.main, ["metrics", str(path), "--output-dir", str(out)], capsys)
    assert_one_error(code, err, needles)
    assert not out.exists() or not list(out.iterdir()), "a failed run wrote tables"
    LEDGER["bad_inputs"] += 2


def test_the_valid_files_pass(valid, tmp_path, capsys):
    """The control: the unbroken files draw and analyze, so every failure above is the breakage's."""
    for suffix, path in valid.items():
        code, err = run_main(visualize_attention.main, ["--input_file", str(path), "--output_file",
                                                        str(tmp_path / f"f{suffix}.png")], capsys)
        assert code == 0, err
        code, err = run_main(analyze_attention.main, ["metrics", str(path), "--output-dir",
                                                      str(tmp_path / f"m{suffix}")], capsys)
        assert code == 0, err


def test_damaged_text_deep_in_a_corpus_stops_the_run(valid, tmp_path, capsys):
    """The first text is fine, the second damaged: the run stops at it, naming it, and writes nothing."""
    path = tmp_path / "late.h5"
    shutil.copy(valid[".h5"], path)
    h5_edit(lambda f: replace_attention(f, rows_scaled, text="00000001"))(path)
    code, err = run_main(visualize_attention.main, ["--input_file", str(path), "--index", "0",
                                                    "--output_file", str(tmp_path / "ok.png")], capsys)
    assert code == 0, err  # text 0 is intact and only it is read
    out = tmp_path / "m"
    code, err = run_main(analyze_attention.main, ["rollout", str(path), "--output-dir", str(out)], capsys)
    assert_one_error(code, err, ["text 'b' layer 0 head 1"])
    assert not list(out.iterdir())
    LEDGER["bad_inputs"] += 1


@pytest.mark.slow
def test_damaged_files_as_real_command_lines(valid, tmp_path):
    """The same through a real process: the message, the exit status, no traceback."""
    truncated = tmp_path / "t.h5"
    shutil.copy(valid[".h5"], truncated)
    truncate(0.5)(truncated)
    proc = run_script("visualize_attention.py", "--input_file", truncated, "--output_file", tmp_path / "f.png")
    assert_one_error(proc.returncode, proc.stderr, ["not a readable HDF5 file (truncated?)"])
    nan = tmp_path / "n.json"
    shutil.copy(valid[".json"], nan)
    json_nan(nan)
    proc = run_script("analyze_attention.py", "summary", nan)
    assert_one_error(proc.returncode, proc.stderr, ["NaN or infinite"])
    assert proc.stdout == ""
    LEDGER["bad_inputs"] += 2


def test_count_of_bad_inputs():
    print(f"\nbad stage-2 inputs tried: {LEDGER['bad_inputs']}")
    assert LEDGER["bad_inputs"] >= 2 * len(CASES)
