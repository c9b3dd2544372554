"""bench/bench_extract.py runs end to end in its smoke mode and prints every part of its table.

No timing is asserted: speed is the benchmark's business, not a test's."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_bench_smoke_prints_the_table():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_extract.py"), "--smoke"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for line in ("(a) attnpipe -> HDF5 float16", "(b) HF eager", "(c) HF sdpa", "(d) seed 001",
                 "(e) attnpipe --metrics-only", "(a)/(b)", "(a)/(c)", "(a)/(d)", "(e)/(b)",
                 "bytes/value", "uint8 max abs error", "read: one (text, layer, head) matrix",
                 "analysis:", "peak RSS of a whole extraction", "long input:"):
        assert line in out, f"missing {line!r} in:\n{out}"


def test_checksum_bench_smoke_prints_both_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_checksum.py"), "--smoke"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("with checksums", "without", "every text whole", "random single matrices", "ratio"):
        assert line in result.stdout, f"missing {line!r} in:\n{result.stdout}"


@pytest.mark.slow
def test_bench_startup_smoke_prints_its_ratios():
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_extract.py"), "--startup", "--smoke"],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    for line in ("small BERT, HF / whole process", "MiniLM default threads, HF / whole", "MiniLM 1 thread, HF / whole",
                 "first batch, transformers / direct", "MiniLM first batch, direct loader"):
        assert line in result.stdout, f"missing {line!r} in:\n{result.stdout}"
