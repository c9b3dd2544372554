"""Every reading command on generated damaged files (tests/damaged_files.py): each variant gives
one `error:` line (exit 2, nothing written) or exactly the undamaged file's output.

By default a spread of DEFAULT_COUNT variants runs; ATTNPIPE_DAMAGED=all runs all of them
(about 400: every region's bit flips on three storage layouts, truncations, deleted, retyped and
relabelled fields, links, unwritten chunks), and prints the counts.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import warnings
from pathlib import Path

import pytest

import analyze_attention
import visualize_attention
from attnpipe.errors import run_cli
from damaged_files import BASES, variants, write_base

DEFAULT_COUNT = 30
COMMANDS = {  # name -> argv given the file and an output folder
    "prepare": (visualize_attention.main, lambda f, o: ["-i", str(f), "--mode", "prepare", "--index", "1",
                                                        "-o", str(o / "prepared.json")]),
    "metrics": (analyze_attention.main, lambda f, o: ["metrics", str(f), "--output-dir", str(o / "metrics"),
                                                      "--bootstrap", "10", "--workers", "1"]),
    "summary": (analyze_attention.main, lambda f, o: ["summary", str(f)]),
    "rollout": (analyze_attention.main, lambda f, o: ["rollout", str(f), "--output-dir", str(o / "rollout")]),
}
COUNTS = {"variants": 0, "runs": 0, "errors": 0, "same_output": 0}


def run_command(name: str, path: Path, out: Path, capsys) -> tuple[int, str, str, dict]:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    main, argv = COMMANDS[name]

    def too_slow(signum, frame):
        raise TimeoutError(f"{name} hung on {path.name}")

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.alarm(60)  # a hang (an external link to a FIFO) fails the test instead of stalling it
    # pytest keeps warnings off stderr; a command run by hand prints them (numpy's RuntimeWarning
    # before the error line was issue 16's bug), so they count as stderr lines here.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            status = run_cli(main, argv(path, out))
        except SystemExit as stop:
            status = stop.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    captured = capsys.readouterr()
    shown = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    return status, captured.out, shown + captured.err, files


def all_variants(folder: Path) -> list[tuple[str, str]]:
    fifo = folder / "pipe"
    if not fifo.exists():
        os.mkfifo(fifo)
    every = os.environ.get("ATTNPIPE_DAMAGED") == "all"
    found = []
    for kind, storage in BASES.items():
        base = write_base(folder / f"valid-{kind}.h5", storage)
        for name, breakage in variants(base, every, fifo if kind == "gzip" else None):
            found.append((kind, name, breakage))
    if not every:  # an even spread over the kinds of damage
        step = len(found) / DEFAULT_COUNT
        found = [found[int(i * step)] for i in range(DEFAULT_COUNT)]
    return found


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("damaged")
    yield folder, all_variants(folder)
    if os.environ.get("ATTNPIPE_DAMAGED") == "all":
        print(f"\ndamaged files: {COUNTS}", file=sys.__stderr__)


def test_every_reading_command_refuses_or_matches_on_damaged_files(damaged, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["attnpipe"])
    folder, found = damaged
    work = folder / "work"
    work.mkdir(exist_ok=True)
    path, out = work / "attention.h5", work / "out"
    reference = {}
    for kind in BASES:
        shutil.copy(folder / f"valid-{kind}.h5", path)
        reference[kind] = {name: run_command(name, path, out, capsys) for name in COMMANDS}
        assert all(r[0] == 0 for r in reference[kind].values()), reference[kind]
    problems = []
    for kind, variant, breakage in found:
        shutil.copy(folder / f"valid-{kind}.h5", path)
        breakage(path)
        COUNTS["variants"] += 1
        for name in COMMANDS:
            status, stdout, stderr, files = run_command(name, path, out, capsys)
            COUNTS["runs"] += 1
            lines = stderr.strip().splitlines()
            if status == 0 and (stdout, stderr, files) == reference[kind][name][1:]:
                COUNTS["same_output"] += 1
            elif status == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not files and not stdout:
                # exactly the one line on stderr: no warning (recorded above) before it
                COUNTS["errors"] += 1
            else:
                problems.append(f"{kind}-{variant} {name}: exit {status}, stderr {stderr[-300:]!r}, "
                                f"files {sorted(files)}")
    assert not problems, f"{len(problems)} of {COUNTS['runs']} runs:\n" + "\n".join(problems[:20])
