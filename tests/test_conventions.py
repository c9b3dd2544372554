"""What users of this kind of tool expect: the Python API (attnpipe.open / attnpipe.extract),
output folders made as asked, every corpus problem in one error by line of the user's file
(CLI and `snakemake -n`), --skip-empty / skip_empty, plain `snakemake -n`, one-line config errors.

CLIs run in this process (attnpipe.errors.run_cli, as their __main__ does); snakemake as a user
types it (subprocess), since the shell and its exit status are the point there.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

import attnpipe
import extract_attention
import visualize_attention
from attnpipe.errors import AttnpipeError, run_cli
from attnpipe.store.atomic import AtomicFile
from conftest import ROOT
from workflow_support import SNAKEMAKE, env, write_config


def cli(capsys, main, *args) -> tuple[int, str]:
    status = run_cli(main, [str(a) for a in args])
    return status, capsys.readouterr().err


# ----------------------------------------------------------------------------- the Python API


@pytest.fixture(scope="module")
def bert(tiny_model_dir) -> Path:
    return tiny_model_dir("bert")


def test_extract_in_memory_equals_the_cli_json(bert, tmp_path, capsys):
    status, err = cli(capsys, extract_attention.main, "--model_dir", bert, "--text", "the cat sat on the mat",
                      "-q", "--output_file", tmp_path / "cli.json")
    assert status == 0, err
    memory = attnpipe.extract(["the cat sat on the mat"], model=bert)
    assert not list(tmp_path.glob("*.h5")) and memory.path == Path("<memory>")
    from_cli = attnpipe.open(tmp_path / "cli.json")
    a, b = memory["text-0"], from_cli[0]
    assert a.id == b.id == "text-0" and a.tokens == b.tokens and np.array_equal(a.token_ids, b.token_ids)
    assert a.attention().dtype == np.float32 and np.array_equal(a.attention(), b.attention())  # to the bit
    assert memory.meta.weights_sha256 == from_cli.meta.weights_sha256
    table = memory.metrics()
    assert list(table.columns) == ["text_id", "layer", "head", "metric", "value"]
    assert np.allclose(table["value"], from_cli.metrics()["value"], rtol=0, atol=0, equal_nan=True)


def test_model_indices_xarray_and_a_stored_subset(bert, tmp_path, capsys):
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    texts = ["--text", "the cat sat", "--text", "a dog ran fast"]
    assert cli(capsys, extract_attention.main, "--model_dir", bert, *texts, "-q", "-o", full)[0] == 0
    assert cli(capsys, extract_attention.main, "--model_dir", bert, *texts, "--layer", "1", "--heads", "1,3",
               "-q", "-o", part)[0] == 0
    with attnpipe.open(full) as whole, attnpipe.open(part) as subset:
        assert subset.layers == (1,) and subset.heads == (1, 3)
        text = subset["text-1"]
        # model indices, not positions in the stored subset
        assert np.array_equal(text.attention(1, 3), whole["text-1"].attention(1, 3))
        assert np.array_equal(subset.attention("text-1", 1, 3), text.attention(1, 3))  # one chunk read
        assert text.attention(-1, -1).shape == (len(text.tokens),) * 2
        with pytest.raises(AttnpipeError, match=r"layer 0 is out of range: .* stores layers 1"):
            text.attention(0, 1)
        with pytest.raises(AttnpipeError, match=r"head 0 is out of range: .* stores heads 1, 3"):
            text.attention(1, 0)
        da = text.to_xarray()
        assert da.dims == ("layer", "head", "query", "key")
        assert list(da.coords["layer"].values) == [1] and list(da.coords["head"].values) == [1, 3]
        assert list(da.coords["query_token"].values) == list(text.tokens) == list(da.coords["key_token"].values)
        assert np.array_equal(da.sel(layer=1, head=3).values, text.attention(1, 3))
        assert da.attrs["text_id"] == "text-1"
        assert "<table>" in subset._repr_html_() and "part.h5" in subset._repr_html_()


def test_repr_html_is_the_viewer_in_a_sandboxed_frame(bert):
    text = attnpipe.extract("the cat sat", model=bert)[0]
    hostile = "</iframe><script>alert(1)</script>\"'&"
    text.item = dataclasses.replace(text.item, tokens=(hostile,) + text.tokens[1:])
    frame = text._repr_html_()
    assert frame.startswith('<iframe sandbox="allow-scripts"') and frame.endswith("></iframe>")
    inner = frame[frame.index('srcdoc="') + 8:frame.rindex('"></iframe>')]
    assert "<" not in inner and '"' not in inner  # the page, escaped: nothing can leave the attribute
    assert "&lt;script" in inner  # the viewer's own script, inline


# ----------------------------------------------------------------------------- output folders


def test_output_folders_are_made_and_removed_when_the_write_fails(bert, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "a.json"
    assert cli(capsys, extract_attention.main, "--model_dir", bert, "--text", "the cat", "-q", "-o", out)[0] == 0
    assert out.is_file()
    figs = tmp_path / "figs" / "sub"
    status, err = cli(capsys, visualize_attention.main, "--input_file", out, "--mode", "heads", "--layer", "all",
                      "--output-dir", figs)
    assert status == 0, err
    assert sorted(p.name for p in figs.iterdir()) == ["attention_heads_0.png", "attention_heads_1.png"]
    # a refused run makes no folder
    status, err = cli(capsys, visualize_attention.main, "--input_file", out, "--layer", "7", "-o",
                      tmp_path / "never" / "x.png")
    assert status == 2 and not (tmp_path / "never").exists()
    # a write that fails after the folder was made leaves nothing: not the file, not the folders
    target = tmp_path / "gone" / "a" / "b.h5"
    atomic = AtomicFile(target)
    assert atomic.tmp.parent == target.parent and target.parent.is_dir()
    atomic.discard()
    assert not (tmp_path / "gone").exists()


# ----------------------------------------------------------------------------- corpus problems

BAD_CSV = 'id,text\na,hello there\nb,\nc,"two\nlines"\na,again\nd,  \ne,the end\n'


def test_every_corpus_problem_in_one_error_with_the_users_lines(bert, tmp_path, capsys):
    corpus = tmp_path / "texts.csv"
    corpus.write_text(BAD_CSV, encoding="utf-8")
    out = tmp_path / "o.h5"
    status, err = cli(capsys, extract_attention.main, "--model_dir", bert, "--texts-file", corpus,
                      "--id-column", "id", "-o", out)
    assert status == 2 and not out.exists()
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert (f"{corpus} has 3 problems: line 3 has an empty text in column 'text'; line 6 repeats text id 'a' "
            "(first on line 2); line 7 has an empty text in column 'text'") in err
    assert "--skip-empty" in err
    # many problems: the first 20 and how many
    many = tmp_path / "many.txt"
    many.write_text("".join(json.dumps({"id": "x", "text": "t"}) + "\n" for _ in range(26)), encoding="utf-8")
    many = many.rename(tmp_path / "many.jsonl")
    status, err = cli(capsys, extract_attention.main, "--model_dir", bert, "--texts-file", many, "-o", out)
    assert status == 2 and "has 25 problems (the first 20 of 25 shown): line 2 repeats text id 'x'" in err
    assert "line 21 repeats" in err and "line 22 repeats" not in err
    # a folder given as the texts file
    folder = tmp_path / "corpus"
    folder.mkdir()
    status, err = cli(capsys, extract_attention.main, "--model_dir", bert, "--texts-file", folder, "-o", out)
    assert status == 2 and f"texts file is a folder: {folder}" in err


def test_skip_empty_runs_and_says_what_it_skipped(bert, tmp_path, capsys):
    corpus = tmp_path / "texts.csv"
    corpus.write_text(BAD_CSV.replace("a,again", "f,again"), encoding="utf-8")
    out = tmp_path / "o.h5"
    status, err = cli(capsys, extract_attention.main, "--model_dir", bert, "--texts-file", corpus,
                      "--id-column", "id", "--skip-empty", "-o", out)
    assert status == 0, err
    assert f"skipped 2 empty text(s) of {corpus} (--skip-empty): line(s) 3, 7" in err
    with attnpipe.open(out) as f:
        assert f.ids == ("a", "c", "f", "e") and f.meta.skipped_empty == (3, 7)
    with h5py.File(out) as raw:
        assert list(raw.attrs["skipped_empty"]) == [3, 7]
    plain = tmp_path / "plain.h5"
    assert cli(capsys, extract_attention.main, "--model_dir", bert, "--text", "the cat", "-q", "-o", plain)[0] == 0
    with h5py.File(plain) as raw:
        assert "skipped_empty" not in raw.attrs  # files without skipped texts are as before


# ----------------------------------------------------------------------------- snakemake


def dry_run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(SNAKEMAKE), "-n", *args], cwd=cwd, capture_output=True, text=True, timeout=400,
                          env=env())


def test_plain_snakemake_plans_the_demo(tmp_path):
    checkout = tmp_path / "checkout"  # the checkout as a user has it (linked: nothing is written into ours)
    checkout.mkdir()
    for entry in ROOT.iterdir():
        if entry.name not in (".git", ".venv", "results", ".snakemake", ".pytest_cache"):
            (checkout / entry.name).symlink_to(entry)
    run = dry_run(checkout)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "results/demo/report.md" in run.stdout
    assert sum(1 for line in run.stdout.splitlines() if line.startswith("rule extract:")) == 12


def test_config_mistakes_are_one_line_and_corpus_problems_show_at_dry_run(tmp_path):
    corpus = tmp_path / "texts.csv"
    corpus.write_text(BAD_CSV, encoding="utf-8")
    config = write_config(tmp_path, corpora={"tiny": {"path": str(corpus), "id_column": "id"}},
                          figures={"texts": ["e"], "layer": -1})
    run = dry_run(tmp_path, "-s", str(ROOT / "Snakefile"), "--configfile", str(config))
    assert run.returncode == 1
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert lines == [f"config error: corpora.tiny.path: {corpus} has 3 problems: line 3 has an empty text in "
                     "column 'text'; line 6 repeats text id 'a' (first on line 2); line 7 has an empty text in "
                     "column 'text' (--skip-empty, or skip_empty: true in a workflow corpus, skips empty texts)"]
    # skip_empty: the empty rows are left out and counted (a repeated id would still be refused)
    cfg = yaml.safe_load(config.read_text())
    cfg["corpora"]["tiny"]["skip_empty"] = True
    config.write_text(yaml.safe_dump(cfg))
    corpus.write_text(BAD_CSV.replace("a,again", "f,again"), encoding="utf-8")
    run = dry_run(tmp_path, "-s", str(ROOT / "Snakefile"), "--configfile", str(config), "-p")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"corpus tiny: skipped 2 empty text(s) of {corpus} (skip_empty): line(s) 3, 7" in run.stderr
    assert "--skip-empty" in run.stdout  # the shard job leaves them out too
    # a misspelt key: one line naming it; the schema's report in the log
    cfg["shard_sizee"] = cfg.pop("shard_size")
    config.write_text(yaml.safe_dump(cfg))
    run = dry_run(tmp_path, "-s", str(ROOT / "Snakefile"), "--configfile", str(config))
    assert run.returncode == 1
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: shard_sizee: unknown key"), lines
    assert "Failed validating" in (tmp_path / ".snakemake" / "config_error.log").read_text()


def test_the_report_names_models_plainly(tmp_path, monkeypatch):
    from attnpipe.analyze.commands import shown_model
    from attnpipe.extract.loading import default_model_dir

    assert shown_model(str(default_model_dir())) == "all-MiniLM-L6-v2 (the packaged default model)"
    monkeypatch.chdir(tmp_path)
    assert shown_model(str(tmp_path / "results" / "models" / "ft")) == "results/models/ft"  # the run folder's
    assert shown_model("/elsewhere/model") == "/elsewhere/model"


def test_make_classifier_finds_its_labels_from_any_folder():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_classifier", ROOT / "scripts" / "make_classifier.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.DEFAULT_LABELS.is_file() and module.DEFAULT_LABELS.is_absolute()
