"""Issue 16, reliability and safety: nothing silently wrong.

A model folder whose weights do not fit its config is refused (never filled with random values,
which --verify would agree with), as is one with no real tokenizer; the same check runs before a
workflow starts (attnpipe.extract.checkpoint_fit.folder_problems).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT
from reliability_support import misfit_folders
from test_corrupt_inputs import META, valid_item

import analyze_attention
import extract_attention
import visualize_attention
from attnpipe.errors import AttnpipeError, run_cli
from attnpipe.extract.checkpoint_fit import folder_problems
from attnpipe.store import H5Writer, Storage
from attnpipe.store.checksum import with_fletcher32

EXPECTED = {  # broken folder -> what the one error line must say
    "ddp": "37 parameter(s) of the architecture are not in the weights (embeddings.LayerNorm.bias, "
           "embeddings.LayerNorm.weight, embeddings.position_embeddings.weight and 34 more) (every weight name "
           "starts with 'module.'",
    "noquery": "1 parameter(s) of the architecture are not in the weights "
               "(encoder.layer.0.attention.self.query.weight)",
    "nowords": "(embeddings.word_embeddings.weight)",
    "shape": "encoder.layer.0.attention.self.query.weight has shape [32, 30] in the weights, the config makes [32, 32]",
    "layers3": "parameter(s) of the architecture are not in the weights (encoder.layer.2.",
    "layers1": "weight(s) the configured architecture does not have (encoder.layer.1.",
    "notokenizer": "no usable tokenizer",
}


@pytest.fixture(scope="module")
def misfits(tiny_model_dir, tmp_path_factory):
    return misfit_folders(tiny_model_dir("bert"), tmp_path_factory.mktemp("misfits"))


CASES = [(name, False) for name in sorted(EXPECTED)] + [("noquery", True), ("layers3", True)]


@pytest.mark.parametrize(("name", "verify"), CASES, ids=[f"{n}{'-verify' if v else ''}" for n, v in CASES])
def test_a_model_that_does_not_fit_its_config_is_refused(name, verify, misfits, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["extract_attention.py"])
    capsys.readouterr()  # the fixture's own output
    out = tmp_path / "a.json"
    args = ["--model_dir", str(misfits[name]), "--text", "the cat sat", "--output_file", str(out)]
    status = run_cli(extract_attention.main, args + (["--verify"] if verify else []))
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith("error: ") and EXPECTED[name] in err[0], err[0]
    assert not out.exists()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_workflow_check_agrees_with_the_loader(name, misfits, tiny_model_dir):
    problems = folder_problems(misfits[name])
    wanted = "no tokenizer file" if name == "notokenizer" else EXPECTED[name]
    assert any(wanted in p for p in problems), problems
    assert folder_problems(tiny_model_dir("bert")) == []


# ----------------------------------------------------------------------------- checksums


def test_fletcher32_is_hdf5s_own(tmp_path):
    """Our fletcher32 (for the chunks the writer compresses itself) equals what HDF5 stores and checks."""
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, size=n).astype(np.uint8) for n in (1, 7, 360 * 2 + 1, 5000)]
    arrays += [np.zeros(9, np.uint8), np.full(65535 * 2 + 3, 255, np.uint8), rng.random((3, 333)).astype(np.float16)]
    with h5py.File(tmp_path / "f.h5", "w") as f:
        for i, array in enumerate(arrays):
            f.create_dataset(str(i), data=array, chunks=array.shape, fletcher32=True)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        for i, array in enumerate(arrays):
            _, stored = f[str(i)].id.read_direct_chunk((0,) * array.ndim)
            assert stored == with_fletcher32(array.tobytes()), i


def test_every_dataset_the_writer_makes_is_checked(tmp_path):
    """fletcher32 on every chunked dataset, a crc32 on every string dataset, attrs_crc32 on groups."""
    item = valid_item("a", 5, 0)
    path = tmp_path / "a.h5"
    with H5Writer(path, 1, "float32") as writer:
        writer.write(0, item)
        writer.finish(META)
    unchecked = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and obj.size:
                strings = h5py.check_string_dtype(obj.dtype) is not None
                if not (obj.fletcher32 or (strings and "crc32" in obj.attrs)):
                    unchecked.append(name)
        f.visititems(visit)
        assert "attrs_crc32" in f.attrs and "attrs_crc32" in f["texts/00000000"].attrs
    assert unchecked == []


def _corrupt_heap_token(path: Path) -> None:
    data = path.read_bytes()
    at = data.find(b"[CLS]")
    path.write_bytes(data[:at] + b"[BLS]" + data[at + 5:])


@pytest.mark.parametrize("compression", ["gzip", "lzf", "none"])
def test_a_changed_byte_is_an_error_never_a_different_value(compression, tmp_path, capsys):
    """Bit flips that moved values by 7e-5 (under the row-sum tolerance) in lzf/none chunks, and
    [CLS] -> [BLS] in the string heap, passed before; each is now one error line."""
    storage = Storage(dtype="float32", compression=compression)
    good = tmp_path / "good.h5"
    with H5Writer(good, 1, "float32", storage) as writer:
        writer.write(0, valid_item("a", 6, 0))
        writer.finish(META)
    with h5py.File(good, "r") as f:
        info = f["texts/00000000/attention"].id.get_chunk_info(0)
    for name, damage in (("value", lambda p: _flip(p, info.byte_offset + 40, 0)), ("heap", _corrupt_heap_token)):
        bad = tmp_path / f"{name}.h5"
        shutil.copy(good, bad)
        damage(bad)
        status = run_cli(analyze_attention.main, ["summary", str(bad)])
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2 and len(err) == 1 and "damaged" in err[0], (name, err)


def _flip(path: Path, position: int, bit: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 1 << bit
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- one snapshot per run


def test_metrics_workers_refuse_a_file_replaced_mid_run(tmp_path):
    """Workers reopen the file by path; one replaced meanwhile is refused, not stitched in."""
    from attnpipe.analyze.fast_metrics import corpus_metrics
    from attnpipe.store import open_attention

    def write(path: Path, seed: int) -> None:
        with H5Writer(path, 32, "float32") as writer:
            for i in range(32):
                writer.write(i, valid_item(f"t{i}", 4, seed + i))
            writer.finish(META)

    path, other = tmp_path / "a.h5", tmp_path / "b.h5"
    write(path, 0)
    write(other, 100)
    with open_attention(path) as f:
        os.replace(other, path)  # what a re-run of the extraction does while metrics runs
        with pytest.raises(AttnpipeError, match="changed while it was being read"):
            corpus_metrics(f, workers=2)


# ----------------------------------------------------------------------------- nothing lost


def test_an_output_that_is_an_input_or_inside_the_model_is_refused(tiny_model_dir, tmp_path, capsys):
    model = tiny_model_dir("bert")
    config = (model / "config.json").read_bytes()
    good = tmp_path / "a.json"
    extract = ["--model_dir", str(model), "--text", "the cat", "--output_file"]
    assert run_cli(extract_attention.main, [*extract, str(good)]) == 0
    before = good.read_bytes()
    cases = [
        (extract_attention.main, [*extract, str(model / "config.json")], "is inside the model folder"),
        (extract_attention.main, ["--model_dir", str(model), "--texts-file", str(good), "--output_file", str(good)],
         "is the input"),
        (visualize_attention.main, ["-i", str(good), "--mode", "prepare", "-o", str(good)], "is the input"),
    ]
    capsys.readouterr()
    for main, argv, needle in cases:
        assert run_cli(main, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert (model / "config.json").read_bytes() == config and good.read_bytes() == before


def test_a_failed_analysis_leaves_the_previous_set_of_tables(tmp_path, monkeypatch, capsys):
    """A full disk while writing the second table left new parquet beside old CSVs before."""
    from attnpipe.analyze import tables

    path = tmp_path / "a.h5"
    with H5Writer(path, 2, "float32") as writer:
        for i in range(2):
            writer.write(i, valid_item(f"t{i}", 5, i))
        writer.finish(META)
    out = tmp_path / "out"
    argv = ["metrics", str(path), "--output-dir", str(out), "--bootstrap", "5", "--workers", "1"]
    assert run_cli(analyze_attention.main, argv) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = tables.write_table
    calls = []

    def full_disk(table, folder, stem):
        calls.append(stem)
        if len(calls) == 2:
            raise AttnpipeError(f"could not write {folder / stem}.parquet: No space left on device")
        return real(table, folder, stem)

    monkeypatch.setattr(tables, "write_table", full_disk)
    assert run_cli(analyze_attention.main, argv + ["--seed", "1"]) == 2
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no mix, no hidden folder left


@pytest.mark.slow
def test_sigterm_removes_the_temporary_file_and_exits_143(tiny_model_dir, tmp_path):
    texts = tmp_path / "many.txt"
    texts.write_text("\n".join(f"the cat sat on the mat {i} and it was big" for i in range(3000)))
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, str(ROOT / "extract_attention.py"),
                             "--model_dir", str(tiny_model_dir("bert")),
                             "--texts-file", str(texts), "--output_file", str(out / "a.h5")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any(out.iterdir()):  # the hidden temporary file: the run is writing
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else "slow"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and err.strip().splitlines() == ["error: terminated (SIGTERM)"], err
    assert list(out.iterdir()) == []


# ----------------------------------------------------------------------------- hostile inputs


HOSTILE = {  # file name -> (contents, what the one error line must say)
    "quote.csv": ('id,text\n1,"the cat\n2,a dog\n3,it ran\n', "line 2 is not valid CSV: unexpected end of data"),
    "huge.csv": ("id,text\n1," + "a" * 140_000 + "\n", "field larger than field limit"),
    "dupcols.csv": ("text,text\nthe cat,a dog\n", "names the column(s) 'text' more than once"),
    "extra.csv": ("id,text\n1,the cat,surplus\n", "line 2 has 3 cells for 2 columns"),
    "surrogate.jsonl": ('{"id": "a", "text": "the \\ud800 cat"}\n', "line 1 holds a lone surrogate ('\\ud800')"),
    "deep.jsonl": ("[" * 50_000 + "]" * 50_000 + "\n", "line 1 is JSON nested too deeply"),
    "nullid.jsonl": ('{"id": null, "text": "the cat"}\n',
                     'line 1 has an "id" that is not a string or an integer: null'),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_a_hostile_texts_file_is_one_error_line(name, tiny_model_dir, tmp_path, capsys):
    contents, needle = HOSTILE[name]
    model = tiny_model_dir("bert")
    capsys.readouterr()  # the fixture's own output
    path = tmp_path / name
    path.write_text(contents, encoding="utf-8")
    out = tmp_path / "a.h5"
    status = run_cli(extract_attention.main, ["--model_dir", str(model), "--texts-file", str(path),
                                              "--output_file", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_a_fifo_texts_file_is_refused_without_waiting(tmp_path, capsys):
    fifo = tmp_path / "texts.txt"
    os.mkfifo(fifo)
    status = run_cli(extract_attention.main, ["--texts-file", str(fifo), "--output_file", str(tmp_path / "a.h5")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and err == [f"error: texts file {fifo} is not a regular file (a FIFO, device or socket): "
                                   "give a file on disk"], err


def test_a_special_token_typed_in_a_text_is_text(tiny_model_dir, tmp_path):
    """'[CLS]' inside a text became the [CLS] id with special_tokens_mask False; now it is the
    characters it is, and only the tokenizer's own [CLS]/[SEP] are special."""
    from attnpipe.store import open_attention

    out = tmp_path / "a.json"
    assert run_cli(extract_attention.main, ["--model_dir", str(tiny_model_dir("bert")), "--text", "the [CLS] cat [SEP]",
                                            "--output_file", str(out)]) == 0
    with open_attention(out) as f:
        item = f[0]
    special = [t for t, s in zip(item.tokens, item.special_tokens_mask, strict=True) if s]
    assert special == ["[CLS]", "[SEP]"]
    assert item.tokens.count("[CLS]") == 1 and item.tokens.count("[SEP]") == 1, item.tokens


@pytest.mark.parametrize(("name", "edit", "needle"), [
    ("duplicate-key", lambda text: text.replace('"text":', '"text": "x", "text":', 1), "the key 'text' occurs twice"),
    ("bool-values", lambda text: text.replace('"attention_matrices": [[[[', '"attention_matrices": [[[[true, ', 1),
     "holds true/false where probabilities belong"),
    ("deep", lambda text: "[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    ("huge-number",
     lambda text: text.replace('"attention_matrices": [[[[', '"attention_matrices": [[[[1' + "0" * 400 + ", ", 1),
     "attention_matrices is ragged or not numeric"),
])
def test_a_hostile_json_attention_file_is_one_error_line(name, edit, needle, tmp_path, capsys):
    from attnpipe.store import write_json

    path = tmp_path / "a.json"
    write_json(path, valid_item("a", 4, 0), META)
    path.write_text(edit(path.read_text(encoding="utf-8")), encoding="utf-8")
    status = run_cli(analyze_attention.main, ["summary", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and needle in err[0], err


@pytest.mark.slow
def test_snakemake_dry_run_refuses_a_checkpoint_folder_that_does_not_fit(misfits, tiny_model_dir, tmp_path):
    """The loader's check, made by `snakemake -n` for every checkpoint kind (here hf, and the base
    of a random_init) before any job runs."""
    from workflow_support import snakemake, write_config

    for spec, where in (({"kind": "hf", "path": str(misfits["layers3"])}, "checkpoints.bad.path"),
                        ({"kind": "random_init", "base": str(misfits["noquery"]), "seed": 0}, "checkpoints.bad.base")):
        config = write_config(tmp_path, checkpoints={"bad": spec})
        run = snakemake(tmp_path, config, "-n")
        output = run.stdout + run.stderr
        assert run.returncode != 0 and f"config error: {where}: " in output, output[-2000:]
        assert "the weights do not fit config.json" in output
    good = write_config(tmp_path, checkpoints={"tiny": {"kind": "hf", "path": str(tiny_model_dir("bert"))}})
    run = snakemake(tmp_path, good, "-n")
    assert run.returncode == 0, (run.stdout + run.stderr)[-2000:]
    assert not (tmp_path / "results").exists()


def test_relevance_refuses_a_file_without_every_layer(tiny_model_dir, tmp_path, capsys):
    """docs/METRICS.md: Chefer relevance multiplies every layer; a file of layer 1 alone was used silently."""
    path = tmp_path / "a.h5"
    argv = ["--model_dir", str(tiny_model_dir("bert")), "--text", "the cat sat", "--explain", "output-norm",
            "--layer", "1", "--output_file", str(path)]
    assert run_cli(extract_attention.main, argv) == 0
    capsys.readouterr()
    status = run_cli(analyze_attention.main, ["relevance", str(path), "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and "stores layers [1] of 2; relevance (Chefer et al.)" in err[0], err
    assert not list((tmp_path / "out").iterdir())
