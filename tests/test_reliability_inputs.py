"""Issue 16, the rest of "tracebacks instead of one line": hostile numbers, fields, model folders,
texts, YAML and a full disk inside matplotlib; each is one `error:` line, exit 2, nothing written.

The workflow's side (`snakemake -n`) is in test_snakemake_dry_run_refuses_hostile_configs (slow).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from damaged_files import BASES, edit, set_attr, write_base
from reliability_support import BROKEN_MODELS, broken_model_folders
from test_corrupt_inputs import META, valid_item

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import AttnpipeError, run_cli
from attnpipe.extract.checkpoint_fit import folder_problems
from attnpipe.store import write_json
from attnpipe.workflow_config import MAX_NODES, load_config


def one_error(main, argv, capsys) -> str:
    status = run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith("error: "), (status, err)
    return err[0]


# ----------------------------------------------------------------------------- numbers and fields of files


@pytest.mark.parametrize(("where", "key"), [("/", "num_layers"), ("/", "layers"), ("/", "max_length"),
                                            ("/", "compression_level"), ("/", "attrs_crc32"),
                                            ("texts/00000001", "num_tokens_untruncated")])
def test_an_infinite_integer_attribute_is_one_error_line(where, key, tmp_path, capsys):
    """int(inf) raised OverflowError, a traceback, in every reading command."""
    path = write_base(tmp_path / "a.h5", BASES["gzip"])
    with h5py.File(path) as f:
        shape = np.shape(f[where].attrs[key])
    edit(set_attr(where, key, np.full(shape, np.inf)))(path)
    commands = [(visualize_attention.main, ["-i", str(path), "--mode", "prepare", "--index", "1",
                                            "-o", str(tmp_path / "p.json")])]
    if where == "/":  # summary reads no text's attributes
        commands.append((analyze_attention.main, ["summary", str(path)]))
    for main, argv in commands:
        assert "damaged" in one_error(main, argv, capsys)
    assert not (tmp_path / "p.json").exists()


@pytest.mark.parametrize(("key", "value", "needle"), [
    ("image", {}, "'image' lacks path, size, patch_grid, patch_size"),
    ("image", [1], "'image' must be an object with path, size, patch_grid, patch_size, got list"),
    ("image", {"path": "x.png", "size": 5, "patch_grid": [2, 2], "patch_size": 16}, "'image.size' must be a list"),
    ("target", {}, "'target' lacks text, tokens"),
    ("target", 5, "'target' must be an object"),
    ("num_tokens_untruncated", float("inf"), "'num_tokens_untruncated' must be an integer, got inf"),
    ("num_tokens_untruncated", 1e300, "'num_tokens_untruncated' must be an integer"),
])
def test_a_json_field_of_the_wrong_kind_is_one_error_line(key, value, needle, tmp_path, capsys):
    """{} for image/target raised KeyError; Infinity (which Python's json reads) OverflowError."""
    path = tmp_path / "a.json"
    write_json(path, valid_item("a", 4, 0), META)
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))  # inf is written as Infinity, as a hostile file would hold it
    line = one_error(analyze_attention.main, ["summary", str(path)], capsys)
    assert needle in line, line


@pytest.mark.filterwarnings("error::RuntimeWarning")  # a warning printed before the one line was the bug
def test_a_value_too_large_for_float32_is_one_line_without_a_warning(tmp_path, capsys):
    path = tmp_path / "a.json"
    write_json(path, valid_item("a", 4, 0), META)
    data = json.loads(path.read_text())
    data["attention_matrices"][0][0][0][0] = 1e300  # float32 overflow: numpy warned "overflow encountered in cast"
    path.write_text(json.dumps(data))
    assert "NaN or infinite" in one_error(analyze_attention.main, ["summary", str(path)], capsys)


# ----------------------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def broken_models(tiny_model_dir, tmp_path_factory):
    return broken_model_folders(tiny_model_dir("bert"), tmp_path_factory.mktemp("broken_models"))


@pytest.mark.parametrize("name", sorted(BROKEN_MODELS))
def test_a_model_config_or_weights_file_that_cannot_load_is_one_error_line(name, broken_models, tmp_path, capsys,
                                                                           monkeypatch):
    """Tracebacks before: StrictDataclassFieldValidationError (NaN, "32"), ZeroDivisionError (0 heads),
    SafetensorError (damaged file). The workflow's check (folder_problems) says the same."""
    monkeypatch.setattr(sys, "argv", ["extract_attention.py"])
    capsys.readouterr()
    out = tmp_path / "a.json"
    line = one_error(extract_attention.main, ["--model_dir", str(broken_models[name]), "--text", "the cat",
                                              "--output_file", str(out)], capsys)
    assert BROKEN_MODELS[name][1] in line, line
    assert not out.exists()
    assert any(BROKEN_MODELS[name][1] in p for p in folder_problems(broken_models[name]))


def test_an_empty_vocabulary_is_one_error_line(tiny_model_dir, tmp_path, capsys):
    """A BERT folder whose vocab.txt holds nothing (or only special tokens): every word would be [UNK]."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir("bert"), folder)
    (folder / "tokenizer.json").unlink()
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**settings, "tokenizer_class": "BertTokenizer"}))
    for vocabulary in ("", "[PAD]\n[UNK]\n[CLS]\n[SEP]\n"):
        (folder / "vocab.txt").write_text(vocabulary)
        line = one_error(extract_attention.main, ["--model_dir", str(folder), "--text", "the cat",
                                                  "--output_file", str(tmp_path / "a.json")], capsys)
        assert "has no usable tokenizer" in line, line
    assert not (tmp_path / "a.json").exists()


def test_method_hf_refuses_remote_code_like_the_default_method(tiny_model_dir, tmp_path, capsys):
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir("bert"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "modeling_x.XModel"}}))
    marker = tmp_path / "RAN"
    (folder / "modeling_x.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    for method in ([], ["--method", "hf"]):
        line = one_error(extract_attention.main, ["--model_dir", str(folder), "--text", "the cat", *method,
                                                  "--output_file", str(tmp_path / "a.json")], capsys)
        assert "asks to run its own Python code" in line and "--trust-remote-code" in line, line
    assert not marker.exists() and not (tmp_path / "a.json").exists()


# ----------------------------------------------------------------------------- texts


@pytest.mark.parametrize("flags", [["--text", "the \udcff cat"], ["--source", "the \ud800", "--target", "a cat"]])
def test_a_lone_surrogate_on_the_command_line_is_one_error_line(flags, tiny_model_dir, tmp_path, capsys):
    """Bytes of argv that are not UTF-8 reach Python as lone surrogates ('\\udcff' for 0xff):
    the tokenizer raised TypeError before."""
    line = one_error(extract_attention.main, ["--model_dir", str(tiny_model_dir("bert")), *flags,
                                              "--output_file", str(tmp_path / "a.json")], capsys)
    assert "a lone surrogate" in line and "number 1" in line, line
    assert not (tmp_path / "a.json").exists()


# ----------------------------------------------------------------------------- YAML


def test_a_deep_or_exploding_yaml_config_is_refused_quickly(tmp_path):
    deep = tmp_path / "deep.yaml"
    deep.write_text("run: x\nnested: " + "[" * 50_000 + "]" * 50_000 + "\n")
    laughs = tmp_path / "laughs.yaml"
    lines = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for prev, name in zip("abcdefghi", "bcdefghij"):
        lines.append(f"{name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    laughs.write_text("\n".join(lines) + "\n")
    twice = tmp_path / "twice.yaml"
    twice.write_text("run: a\nrun: b\n")
    for path, needle in ((deep, "line 2: YAML nested more than 64 deep"),
                         (laughs, f"its aliases (*name) expand to more than {MAX_NODES} values"),
                         (twice, "duplicate name 'run' (line 2")):
        start = time.perf_counter()
        with pytest.raises(AttnpipeError, match=r".*") as caught:
            load_config(path)
        assert needle in str(caught.value), caught.value
        assert time.perf_counter() - start < 5
    ok = tmp_path / "ok.yaml"
    ok.write_text("a: &x {b: [1, 2]}\nc: *x\n")
    assert load_config(ok) == {"a": {"b": [1, 2]}, "c": {"b": [1, 2]}}


# ----------------------------------------------------------------------------- a full disk inside matplotlib


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_a_full_disk_inside_matplotlibs_writer_leaves_the_previous_figure(suffix, tmp_path, monkeypatch, capsys):
    """The writer fails half-way (ENOSPC from its file's write, as a full disk gives): one line,
    no partial file, the existing figure untouched."""
    from matplotlib.figure import Figure

    path = tmp_path / "a.json"
    write_json(path, valid_item("a", 4, 0), META)
    figure = tmp_path / f"heads{suffix}"
    argv = ["-i", str(path), "--mode", "heads", "--layer", "0", "-o", str(figure)]
    assert run_cli(visualize_attention.main, argv) == 0
    before = figure.read_bytes()
    real = Figure.savefig

    def full_disk(self, fname, **kwargs):
        real(self, fname, **kwargs)  # the bytes of a real figure, then the disk is full
        with open(fname, "r+b") as fh:
            fh.truncate(100)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full_disk)
    capsys.readouterr()
    line = one_error(visualize_attention.main, argv, capsys)
    assert line == f"error: could not write {figure}: No space left on device (disk full or file-size limit?)", line
    assert figure.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", figure.name]  # no temporary file left
    out = tmp_path / "spec"
    line = one_error(analyze_attention.main, ["specialization", str(path), "--output-dir", str(out)], capsys)
    assert "No space left on device" in line, line
    assert not out.exists() or not list(out.iterdir())


# ----------------------------------------------------------------------------- the workflow (snakemake -n)


@pytest.mark.slow
def test_snakemake_dry_run_refuses_hostile_configs(broken_models, tmp_path):
    """Each: one `config error:` line naming the key or file, quickly, before any job. (A YAML nested
    50,000 deep never reaches the Snakefile: Snakemake parses --configfile first and stops with its
    own RecursionError; 100 deep is parsed by Snakemake and refused here.)"""
    import yaml
    from workflow_support import snakemake, write_config

    def bad_yaml(name: str, text: str) -> Path:
        path = write_config(tmp_path, name=name)
        path.write_text(path.read_text() + text)
        return path

    laughs = ['a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    laughs += [f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefghi", "bcdefghij")]
    cases = [
        (bad_yaml("laughs.yaml", "\n".join(laughs) + "\n"), "its aliases (*name) expand to more than"),
        (bad_yaml("deep.yaml", "nested: " + "[" * 100 + "]" * 100 + "\n"), "YAML nested more than 64 deep"),
        (write_config(tmp_path, name="long.yaml", extraction={"max_length": 100_000_000}),
         "extraction.max_length: 100000000 is greater than the maximum of 1048576"),
        (write_config(tmp_path, name="positions.yaml", extraction={"max_length": 1000}),
         "extraction.max_length: 1000 is more than the 512 positions of checkpoint"),
        (write_config(tmp_path, name="nan.yaml", checkpoints={
            "bad": {"kind": "hf", "path": str(broken_models["heads-nan"])}}),
         "checkpoints.bad.path: ", "num_attention_heads is nan, not a positive integer"),
        (write_config(tmp_path, name="truncated.yaml", checkpoints={
            "bad": {"kind": "random_init", "base": str(broken_models["safetensors-truncated"])}}),
         "checkpoints.bad.base: ", "model.safetensors is damaged (truncated?)"),
    ]
    for config, *needles in cases:
        assert yaml.safe_load(config.read_text())  # valid YAML: Snakemake itself reads it
        start = time.perf_counter()
        run = snakemake(tmp_path, config, "-n", timeout=120)
        took = time.perf_counter() - start
        lines = [line for line in run.stderr.splitlines() if line.startswith("config error: ")]
        assert run.returncode == 1 and len(lines) == 1, (config.name, run.stderr[-2000:])
        assert all(needle in lines[0] for needle in needles), lines[0]
        assert "Traceback" not in run.stderr and took < 60, (config.name, took)
    assert not (tmp_path / "results").exists()


# ----------------------------------------------------------------------------- out of memory (ulimit -v)


def test_an_allocation_refused_for_memory_is_one_error_line(capsys):
    """MemoryError (numpy's too) and torch's allocator RuntimeError: one line with a hint; any other
    RuntimeError is still a bug, shown as a traceback."""
    import torch

    def allocate_too_much(argv):
        return torch.empty(2**62, dtype=torch.uint8)  # DefaultCPUAllocator: can't allocate memory

    def numpy_too_much(argv):
        return np.empty(2**62, dtype=np.uint8)  # numpy's _ArrayMemoryError, a MemoryError

    for main in (allocate_too_much, numpy_too_much):
        assert run_cli(main, []) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: out of memory (") and "ulimit -v" in err[0], err

    def a_bug(argv):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli(a_bug, [])


# The child imports what the command needs, then caps its address space (RLIMIT_AS, what `ulimit -v`
# sets) at what it has mapped plus MARGIN: the imports fit on any machine, the text's matrices do not.
CHILD = """
import resource, sys
sys.path.insert(0, {root!r})
import matplotlib, numpy, torch  # noqa: F401
import analyze_attention, visualize_attention
from attnpipe.analyze import commands  # noqa: F401
from attnpipe.visualize import plots, prepare, run  # noqa: F401
size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (size + {margin}, size + {margin}))
sys.argv = [{script!r}, *sys.argv[1:]]
sys.exit({module}.cli())
"""
MARGIN = 60 * 2**20  # the 1200-token text decodes to 35 MB of float32, and each step copies it


@pytest.mark.slow
@pytest.mark.parametrize("command", ["summary", "prepare"])
def test_ulimit_v_during_analysis_or_visualization_is_one_error_line(command, tmp_path):
    import dataclasses
    import os
    import subprocess

    from attnpipe.store import H5Writer, Storage
    from conftest import ROOT

    path = tmp_path / "long.h5"
    with H5Writer(path, 1, "float16", Storage(dtype="float16", compression="lzf")) as writer:
        writer.write(0, valid_item("a", 1200, 0))
        writer.finish(dataclasses.replace(META, dtype="float16"))
    out = tmp_path / "out.json"
    script, argv = (("analyze_attention.py", ["summary", str(path)]) if command == "summary" else
                    ("visualize_attention.py", ["-i", str(path), "--mode", "prepare", "-o", str(out)]))
    child = CHILD.format(root=str(ROOT), margin=MARGIN, script=script, module=script[:-3])
    proc = subprocess.run([sys.executable, "-c", child, *argv], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr[-2000:]
    assert err[0].startswith("error: out of memory (") and "raise the limit" in err[0], err[0]
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["long.h5"]


@pytest.mark.parametrize(("row", "needle"), [
    ('{"source": "the cat", "target": {}}', 'line 1 has no string "target" field'),
    ('{"source": "the cat", "target": "a dog", "id": {}}', 'line 1 has an "id" that is not a string or an integer: {}'),
    ('{"source": "the cat", "target": "a dog", "id": NaN}', 'line 1 has an "id" that is not a string or an integer: NaN'),
])
def test_a_pairs_file_with_an_object_target_or_id_is_one_error_line(row, needle, tmp_path):
    """An object id became the pair id "{}" (str() of it) before; the texts reader refused it already."""
    from attnpipe.extract.corpus import read_pairs_file

    path = tmp_path / "pairs.jsonl"
    path.write_text(row + "\n")
    with pytest.raises(AttnpipeError) as caught:
        read_pairs_file(path)
    assert needle in str(caught.value), caught.value


def test_a_full_disk_during_report_leaves_the_previous_report(tmp_path, monkeypatch, capsys):
    """`report` left a partial folder before; now its files are staged and moved only when all are
    written (attnpipe.analyze.tables.staged_output_dir), so the previous report stays whole."""
    from matplotlib.figure import Figure

    from attnpipe.store import H5Writer

    path = tmp_path / "a.h5"
    with H5Writer(path, 2, "float32") as writer:
        for i in range(2):
            writer.write(i, valid_item(f"t{i}", 5, i))
        writer.finish(META)
    out = tmp_path / "report"
    argv = ["report", str(path), "--output-dir", str(out)]
    assert run_cli(analyze_attention.main, argv) == 0
    before = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert len([name for name in before if name.endswith(".png")]) >= 2
    real, calls = Figure.savefig, []

    def full_disk_on_the_second_figure(self, fname, **kwargs):
        calls.append(fname)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fname, **kwargs)

    monkeypatch.setattr(Figure, "savefig", full_disk_on_the_second_figure)
    capsys.readouterr()
    assert "No space left on device" in one_error(analyze_attention.main, argv, capsys)
    after = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert after == before and not [p for p in out.iterdir() if p.name.startswith(".")]
