"""Faults during extraction: SIGKILL at many points, a file-size limit, two runs on one output.

Kills use the test-only hook of attnpipe/faults.py (`ATTNPIPE_FAULT_AT=<point>:<n>`: the process
sends itself SIGKILL the n-th time it reaches the point, with no cleanup at all), plus one kill
from outside once the run's temporary file is seen. After each kill:
- the output path holds nothing, or exactly the file that was there before the run (byte for byte);
- nothing else is left but hidden `.NAME.*.tmp` files, which no tool reads;
- a re-run in the same folder writes the complete file, byte-identical to an undisturbed run.
`LEDGER` counts faults injected and files lost; the last test prints it and asserts no loss.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from attnpipe.extract.corpus import Text
from attnpipe.extract.runner import ExtractConfig, extract
from attnpipe.store import open_attention
from conftest import ROOT

pytestmark = pytest.mark.slow  # each case starts a Python process that imports torch (3-5 s)

TEXTS = ["the cat sat", "a dog ran fast on the mat and it was red", "it was red",
         "big blue mat , small red dog", "the cat"]
BATCH = "2"  # 5 texts in 3 batches: kills land before, between and after batches
LEDGER = {"faults": 0, "lost": 0, "bad_inputs": 0}

# (point:n of attnpipe/faults.py, whether an earlier result already sits at the output path)
H5_FAULTS = [
    ("load:1", False),  # loading the model
    ("loaded:1", True),
    ("batch:1", False),  # after a forward pass, nothing written yet
    ("batch:2", True),  # mid-run: one batch in the temporary file
    ("batch:3", False),
    ("write:1", True),  # mid-write: a text's attention written, its tokens not
    ("write:3", False),
    ("write:5", True),  # the last text
    ("finish:1", False),  # ids written, provenance not
    ("close:1", True),  # file closed and complete, not yet renamed
]
JSON_FAULTS = [("batch:1", True), ("json:1", False), ("json:1", True)]


def command(model_dir: Path, texts_file: Path, output: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ROOT / "extract_attention.py"), "--model_dir", str(model_dir),
            "--texts-file", str(texts_file), "--output_file", str(output), "--batch-size", BATCH, "-q", *extra]


def run(cmd: list[str], fault: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ATTNPIPE_FAULT_AT", None)
    if fault:
        env["ATTNPIPE_FAULT_AT"] = fault
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, preexec_fn=preexec,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """A texts file, an undisturbed reference run, and an earlier, different result (layer 0 only).

    References are made in this process (the same code the CLI calls, without its start-up cost).
    """
    folder = tmp_path_factory.mktemp("faults")
    model_dir = tiny_model_dir("bert")
    texts = folder / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    one = folder / "one.txt"
    one.write_text(TEXTS[1] + "\n", encoding="utf-8")
    setup = {"model_dir": model_dir, "texts": texts, "one": one, "refs": {}}
    for suffix, texts in ((".h5", TEXTS), (".json", [TEXTS[1]])):
        for name, layers in (("reference", ("all",)), ("earlier", ("0",))):
            out = folder / f"{name}{suffix}"
            rerun_in_process(setup, out, texts, layers)
            setup["refs"][name + suffix] = out.read_bytes()
    return setup


def check_after_kill(folder: Path, output: Path, earlier: bytes | None) -> None:
    if earlier is None:
        if output.exists():
            LEDGER["lost"] += 1
        assert not output.exists(), "a killed run left a file at the output path"
    else:
        intact = output.read_bytes() == earlier
        LEDGER["lost"] += not intact
        assert intact, "a killed run changed the earlier result"
    others = [p.name for p in folder.iterdir() if p != output]
    assert all(name.startswith(f".{output.name}.") and name.endswith(".tmp") for name in others), others


def rerun_in_process(setup, output: Path, texts: list[str], layers=("all",)) -> None:
    """What the CLI does for `command(...)`; the re-run after a kill, in the same folder."""
    ids = [f"line-{i + 1}" for i in range(len(texts))]  # ids of a .txt file's lines
    extract(ExtractConfig(texts=tuple(Text(i, t) for i, t in zip(ids, texts)), output=output,
                          model_dir=setup["model_dir"], batch_size=int(BATCH), layers=layers, progress=False))


@pytest.mark.parametrize("fault, earlier", H5_FAULTS, ids=[f"{f}-{'over-earlier' if e else 'fresh'}" for f, e in H5_FAULTS])
def test_sigkill_during_h5_extraction_loses_nothing(setup, tmp_path, fault, earlier):
    output = tmp_path / "corpus.h5"
    before = setup["refs"]["earlier.h5"] if earlier else None
    if before is not None:
        output.write_bytes(before)
    proc = run(command(setup["model_dir"], setup["texts"], output), fault=fault)
    LEDGER["faults"] += 1
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    check_after_kill(tmp_path, output, before)
    rerun_in_process(setup, output, TEXTS)
    assert output.read_bytes() == setup["refs"]["reference.h5"], "the re-run differs from an undisturbed run"
    with open_attention(output) as f:
        assert len(f) == len(TEXTS) and all(item.attention.size for item in f)


@pytest.mark.parametrize("fault, earlier", JSON_FAULTS, ids=[f"{f}-{'over-earlier' if e else 'fresh'}" for f, e in JSON_FAULTS])
def test_sigkill_during_json_extraction_loses_nothing(setup, tmp_path, fault, earlier):
    output = tmp_path / "attention_data.json"
    before = setup["refs"]["earlier.json"] if earlier else None
    if before is not None:
        output.write_bytes(before)
    proc = run(command(setup["model_dir"], setup["one"], output), fault=fault)
    LEDGER["faults"] += 1
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    check_after_kill(tmp_path, output, before)
    rerun_in_process(setup, output, [TEXTS[1]])
    assert output.read_bytes() == setup["refs"]["reference.json"]


def test_sigkill_from_outside_once_writing_has_begun(setup, tmp_path):
    """No hook: kill -9 from another process as soon as the temporary file appears."""
    output = tmp_path / "corpus.h5"
    earlier = setup["refs"]["earlier.h5"]
    output.write_bytes(earlier)
    many = tmp_path.parent / f"{tmp_path.name}-many.txt"
    many.write_text("\n".join(TEXTS * 20) + "\n", encoding="utf-8")  # 100 texts: time to catch it
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ATTNPIPE_FAULT_AT", None)
    proc = subprocess.Popen(command(setup["model_dir"], many, output), env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".corpus.h5.*.tmp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run ended before it could be killed"
    LEDGER["faults"] += 1
    check_after_kill(tmp_path, output, earlier)
    many.unlink()


def test_file_size_limit_gives_one_clear_error_and_no_file(setup, tmp_path):
    """RLIMIT_FSIZE below the output's size: writes would fail with EFBIG (SIGXFSZ ignored).

    HDF5: refused before the text that would not fit (attnpipe.store checks the room left).
    JSON: the write itself fails with EFBIG and is reported.
    """
    def limit():  # in the child, before exec; an ignored signal stays ignored across exec
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4_000, 4_000))  # below every output here

    cases = [(tmp_path / "fresh.h5", setup["texts"], None, "the file-size limit (ulimit -f) leaves"),
             (tmp_path / "kept.h5", setup["texts"], setup["refs"]["earlier.h5"], "the file-size limit"),
             (tmp_path / "fresh.json", setup["one"], None, "File too large")]
    for output, source, before, needle in cases:
        if before is not None:
            output.write_bytes(before)
        proc = run(command(setup["model_dir"], source, output), preexec=limit)
        LEDGER["faults"] += 1
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert lines[0].startswith(f"error: could not write {output}: "), lines[0]
        assert needle in lines[0] and lines[0].endswith("(disk full or file-size limit?)"), lines[0]
        assert (output.read_bytes() == before) if before else not output.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.h5"], "no temporary file may be left"


def test_two_runs_writing_one_output_leave_one_complete_file(setup, tmp_path):
    """Both runs write their own temporary file and rename it: the last rename wins, whole."""
    output = tmp_path / "shared.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("ATTNPIPE_FAULT_AT", None)
    runs = [subprocess.Popen(command(setup["model_dir"], setup["texts"], output, "--layer", layer),
                             env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for layer in ("0", "1")]
    for proc in runs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    LEDGER["faults"] += 1
    assert [p.name for p in tmp_path.iterdir()] == ["shared.h5"]
    with open_attention(output) as f:
        assert f.meta.layers in ((0,), (1,))
        assert len(f) == len(TEXTS) and all(item.attention.shape[0] == 1 for item in f)


def test_ledger_no_file_lost():
    print(f"\nfaults injected: {LEDGER['faults']}, files lost: {LEDGER['lost']}")
    assert LEDGER["lost"] == 0
