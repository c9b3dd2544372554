"""docs/ERRORS.md is the specification: every catalogued mistake, run, gives its message and exit code.

The test parses the catalogue's tables, fills the placeholders with files made here, and runs
each row: the scripts' main() as their `__main__` runs it (attnpipe.errors.run_cli, in this
process: one Python start-up for ~70 cases), the workflow rows as `snakemake -n`. A script row
must print exactly one stderr line matching the catalogued message (argparse rows: the usage,
then that line), exit with the catalogued status, and leave no file in the output folder.
Three rows also run as real command lines.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import run_cli
from attnpipe.store import H5Writer, write_json
from conftest import ROOT, run_script, save_tiny_model, write_test_images
from seq2seq_tiny import save_tiny_seq2seq
from test_corrupt_inputs import META, h5_edit, json_nan, ragged, replace_attention, rows_scaled, truncate, valid_item
from test_security import evil_state_dict, remote_code_folder
from damaged_files import edit, external_link, replace_dataset, set_attr, soft_link
from reliability_support import broken_model_folders, misfit_folders

DAMAGED = {  # placeholders of issue 16's rows: the valid {h5} broken one way each
    "h5_layers_unsorted": edit(set_attr("/", "layers", np.array([1, 0]))),
    "h5_ids_repeated": edit(replace_dataset("ids", lambda v: v[[0, 0]], dtype=h5py.string_dtype())),
    "h5_soft_link": edit(soft_link("texts/00000001", "/texts/00000000")),
    "h5_external_link": edit(external_link("texts/00000001/tokens", "/dev/stdin", "/x")),
    "h5_version_string": edit(set_attr("/", "schema_version", "2")),
    "h5_heap_flip": lambda path: path.write_bytes(path.read_bytes().replace(b"[CLS]", b"[BLS]", 1)),
    "h5_num_layers_inf": edit(set_attr("/", "num_layers", np.inf)),
}

CATALOGUE = ROOT / "docs" / "ERRORS.md"
MAINS = {"extract_attention.py": extract_attention.main, "visualize_attention.py": visualize_attention.main,
         "analyze_attention.py": analyze_attention.main}


def parse_catalogue() -> list[dict]:
    rows = []
    for line in CATALOGUE.read_text(encoding="utf-8").splitlines():
        if not re.match(r"^\| \d+ \|", line):
            continue
        number, script, mistake, args, status, message = (cell.strip() for cell in line.strip("|").split(" | "))
        rows.append({"number": int(number), "script": script, "mistake": mistake, "args": args.strip("`"),
                     "status": int(status), "message": message.strip("`")})
    return rows


ROWS = parse_catalogue()


def pattern(message: str) -> re.Pattern:
    """The catalogued message as a regex: literal text, `…` = any text."""
    return re.compile(".*".join(re.escape(part) for part in message.split("…")), re.DOTALL)


def test_catalogue_is_complete_and_numbered():
    assert len(ROWS) >= 30
    assert [row["number"] for row in ROWS] == list(range(1, len(ROWS) + 1))
    assert {row["script"] for row in ROWS} == {*MAINS, "Snakefile"}


@pytest.fixture(scope="module")
def files(tiny_model_dir, tiny_vit_dir, tmp_path_factory) -> dict[str, Path]:
    """Every placeholder of the catalogue."""
    d = tmp_path_factory.mktemp("catalogue")
    f: dict[str, Path] = {"model": tiny_model_dir("bert")}

    def text_file(name: str, data: bytes | str) -> Path:
        path = d / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        return path

    f["txt"] = text_file("texts.txt", "the cat sat\na dog ran\n")
    f["docx"] = text_file("texts.docx", "the cat")
    f["binary_txt"] = text_file("binary.txt", b"hello\nwo\x00rld\n")
    f["latin1_txt"] = text_file("latin1.txt", b"caf\xe9 au lait\n")
    f["empty_txt"] = text_file("empty.txt", "\n  \n")
    f["bad_jsonl"] = text_file("bad.jsonl", '{"id": "a", "text": "x"}\n{"id": "b", text}\n')
    f["notext_jsonl"] = text_file("notext.jsonl", '{"id": "a", "body": "x"}\n')
    f["dup_jsonl"] = text_file("dup.jsonl", '{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    f["nul_jsonl"] = text_file("nul.jsonl", '{"id": "n", "text": "the\\u0000cat"}\n')
    f["csv"] = text_file("texts.csv", "id,text\n1,the cat\n")
    f["bad_csv"] = text_file("bad.csv", "id,text\na,the cat\nb,\na,a dog\n")  # issue 17: all problems at once
    f["notext_empty_jsonl"] = text_file("rows.jsonl", '{"id": "a"}\n{"id": "b", "text": " "}\n')
    f["loss_csv"] = text_file("loss.csv", "step,loss_first,loss_repeat,in_context_loss\n0,3.9,3.9,0.0\n")
    for name in ("folder_txt", "folder_h5"):
        f[name] = d / ("afolder.txt" if name == "folder_txt" else "x.h5")
        f[name].mkdir()
    f["model_arch"] = d / "arch"
    shutil.copytree(f["model"], f["model_arch"])
    config = json.loads((f["model_arch"] / "config.json").read_text())
    (f["model_arch"] / "config.json").write_text(json.dumps({**config, "model_type": "made-up-arch"}))
    f["model_noweights"] = d / "noweights"
    f["model_noweights"].mkdir()
    shutil.copy(f["model"] / "config.json", f["model_noweights"] / "config.json")
    f["model_pickle"] = save_tiny_model("bert", d / "pickle")
    (f["model_pickle"] / "model.safetensors").unlink()
    torch.save(evil_state_dict(d / "PWNED"), f["model_pickle"] / "pytorch_model.bin")
    f["model_remote"], _ = remote_code_folder(d)

    items = [valid_item("a", 4, 0), valid_item("b", 6, 1)]

    def h5(name: str, texts, meta=META) -> Path:
        with H5Writer(d / name, len(texts), "float32") as writer:
            for index, item in enumerate(texts):
                writer.write(index, item)
            writer.finish(meta)
        return d / name

    f["h5"] = h5("good.h5", items)
    f["other_h5"] = h5("other.h5", [valid_item("c", 4, 2), valid_item("d", 5, 3)])
    f["empty_h5"] = h5("empty.h5", [])
    for name, source, breakage in (
        ("truncated_h5", "h5", truncate(0.5)),
        ("future_h5", "h5", h5_edit(lambda h: h.attrs.__setitem__("schema_version", 99))),
        ("rows_h5", "h5", h5_edit(lambda h: replace_attention(h, rows_scaled))),
    ):
        f[name] = d / f"{name}.h5"
        shutil.copy(f[source], f[name])
        breakage(f[name])
    f["foreign_h5"] = d / "foreign.h5"
    with h5py.File(f["foreign_h5"], "w") as handle:
        handle["data"] = np.ones(3)
    write_json(d / "good.json", items[1], META)
    f["json"] = d / "good.json"
    for name, breakage in (("nan_json", json_nan), ("ragged_json", None), ("nokeys_json", None)):
        f[name] = d / f"{name}.json"
        shutil.copy(f["json"], f[name])
        if breakage:
            breakage(f[name])
    data = json.loads(f["json"].read_text())
    ragged(data)
    f["ragged_json"].write_text(json.dumps(data))
    data = json.loads(f["json"].read_text())
    del data["attention_matrices"]
    f["nokeys_json"].write_text(json.dumps(data))
    # The other input kinds (the rows of the runner and of --explain).
    f["t5"] = save_tiny_seq2seq("t5", d / "t5")
    f["gpt2"] = tiny_model_dir("gpt2")
    f["vit"] = tiny_vit_dir
    (f["image"],) = write_test_images(d / "images", sizes=((32, 32),))
    (d / "encoders.py").write_text(TORCH_FACTORY)
    f["torch_factory"] = f"{d / 'encoders.py'}:build"
    f["embeddings"] = d / "embeddings.npy"
    np.save(f["embeddings"], np.random.default_rng(0).standard_normal((1, 3, 8)).astype(np.float32))
    f["marker"] = d / "PWNED"
    # Issue 16 (reliability): models whose weights do not fit their config, files that break the
    # format's rules.
    f.update({f"model_{name}": folder for name, folder in misfit_folders(f["model"], d).items()})
    f["quote_csv"] = text_file("quote.csv", 'id,text\n1,"the cat\n2,a dog\n')
    f["fifo_txt"] = d / "fifo.txt"
    os.mkfifo(f["fifo_txt"])
    f["dupkey_json"] = text_file("dupkey.json", f["json"].read_text().replace('"text":', '"text": "x", "text":', 1))
    f["surrogate_text"] = shlex.quote("the \udcff cat")  # what argv byte 0xff becomes (surrogateescape)
    f.update({f"model_{name.replace('-', '_')}": folder for name, folder in broken_model_folders(f["model"], d).items()})
    data = json.loads(f["json"].read_text())
    f["json_image_object"] = text_file("json_image_object.json", json.dumps({**data, "image": {}}))
    for name, breakage in DAMAGED.items():
        f[name] = d / f"{name}.h5"
        shutil.copy(f["h5"], f[name])
        breakage(f[name])
    return f


TORCH_FACTORY = """from torch import nn


def build():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True), 1)
"""


def fill(args: str, files: dict[str, Path], out: Path) -> list[str]:
    text = args.replace("{out}", str(out))
    text = re.sub(r"\{(\w+)\}", lambda m: str(files[m.group(1)]), text)
    return shlex.split(text)


def check_script_result(row: dict, status: int, err: str, out: Path) -> None:
    assert "Traceback" not in err, err
    assert status == row["status"], f"row {row['number']}: exit {status}, stderr:\n{err}"
    lines = err.strip().splitlines()
    assert lines, f"row {row['number']}: nothing on stderr"
    if row["message"].startswith("error: "):
        assert len(lines) == 1, f"row {row['number']}: expected one line, got:\n{err}"
    else:  # argparse: the usage, then its one error line
        assert lines[0].startswith("usage: "), err
    assert pattern(row["message"]).fullmatch(lines[-1]), (
        f"row {row['number']}: {lines[-1]!r} does not match the catalogue's {row['message']!r}")
    written = [p for p in out.rglob("*") if p.is_file()]
    assert not written, f"row {row['number']} wrote {written}"


SCRIPT_ROWS = [row for row in ROWS if row["script"] in MAINS]


@pytest.mark.parametrize("row", SCRIPT_ROWS, ids=[f"{r['number']}-{r['script'].split('_')[0]}" for r in SCRIPT_ROWS])
def test_catalogued_script_mistake(row, files, tmp_path, capsys, monkeypatch):
    if "--device cuda" in row["args"] and torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    monkeypatch.setattr(sys, "argv", [row["script"]])  # argparse names the program from argv[0]
    out = tmp_path / "out"
    out.mkdir()
    try:
        status = run_cli(MAINS[row["script"]], fill(row["args"], files, out))
    except SystemExit as stop:  # argparse
        status = stop.code
    check_script_result(row, status, capsys.readouterr().err, out)
    assert not files["marker"].exists(), "a malicious pickle ran"


@pytest.mark.slow
@pytest.mark.parametrize("number", [19, 44, 70])
def test_catalogued_mistakes_as_real_command_lines(number, files, tmp_path):
    row = next(r for r in ROWS if r["number"] == number)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_script(row["script"], *fill(row["args"], files, out))
    check_script_result(row, proc.returncode, proc.stderr, out)
    assert proc.stdout == ""


WORKFLOW_ROWS = [row for row in ROWS if row["script"] == "Snakefile"]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


@pytest.mark.slow
@pytest.mark.skipif(not SNAKEMAKE.exists(), reason="snakemake not installed in this venv")
@pytest.mark.parametrize("row", WORKFLOW_ROWS, ids=[str(r["number"]) for r in WORKFLOW_ROWS])
def test_catalogued_workflow_mistake(row, tmp_path):
    import yaml

    from test_workflow import snakemake, write_config

    config = write_config(tmp_path, **yaml.safe_load(row["args"]))
    run = snakemake(tmp_path, config, "-n")
    output = run.stdout + run.stderr
    assert run.returncode == row["status"], output[-3000:]
    assert pattern(row["message"]).search(output), f"row {row['number']}: {row['message']!r} not in:\n{output[-3000:]}"
    assert not (tmp_path / "results").exists()
