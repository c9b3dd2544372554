"""Same inputs, same bytes: two runs of the three scripts give byte-identical outputs.

Each run is a fresh Python process with its own PYTHONHASHSEED (so set/dict ordering that
depends on string hashes would show) and its own folder, working with the same relative paths.
It extracts HDF5 and JSON, draws every figure mode (PNG, SVG and PDF among them), writes prepared JSON and
the HTML page, and runs metrics, summary, rollout, specialization, clusters and report (Parquet,
CSV, JSON, PNG, Markdown). Every file of the two folders must be equal byte for byte.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

DRIVER = r"""
import sys
from contextlib import redirect_stdout
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import analyze_attention as A, extract_attention as E, visualize_attention as V

model, texts = sys.argv[2], sys.argv[3]
def ok(main, *argv):
    code = main([str(a) for a in argv])
    assert code == 0, (argv, code)
ok(E.main, "--model_dir", model, "--texts-file", texts, "--output_file", "corpus.h5", "-q", "--batch-size", "2")
ok(E.main, "--model_dir", model, "--text", "the cat sat on the mat", "--output_file", "one.json", "-q",
   "--dtype", "float16")
Path("fig").mkdir()
for fmt in ("png", "svg", "pdf"):
    ok(V.main, "--input_file", "corpus.h5", "--index", "1", "--mode", "plot", "--head", "2", "--output_file", f"fig/plot.{fmt}")
ok(V.main, "--input_file", "corpus.h5", "--mode", "heads", "--layer", "all", "--output-dir", "fig", "--format", "png")
ok(V.main, "--input_file", "one.json", "--mode", "layers", "--output_file", "fig/layers.pdf")
ok(V.main, "--input_file", "one.json", "--mode", "average", "--layer", "all", "--output_file", "fig/average.svg")
ok(V.main, "--input_file", "corpus.h5", "--mode", "prepare", "--decimals", "4", "--output_file", "fig/prepared.json")
ok(V.main, "--input_file", "corpus.h5", "--mode", "html", "--output_file", "fig/page.html")
ok(A.main, "metrics", "corpus.h5", "--output-dir", "metrics", "--bootstrap", "50")
with open("summary.txt", "w") as out, redirect_stdout(out):
    ok(A.main, "summary", "corpus.h5")
ok(A.main, "rollout", "corpus.h5", "--output-dir", "rollout", "--query", "all")
ok(A.main, "specialization", "corpus.h5", "--output-dir", "special")
ok(A.main, "clusters", "corpus.h5", "--output-dir", "clusters", "--clusters", "3")
ok(A.main, "report", "corpus.h5", "--output-dir", "report", "--clusters", "3")
"""

TEXTS = ["the cat sat on the mat", "a dog ran fast", "big blue mat , small red dog ? the cat is slow", "it was red"]


@pytest.mark.slow
def test_two_runs_write_identical_bytes(tiny_model_dir, tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    folders = []
    for run, hash_seed in (("run1", "1"), ("run2", "2")):
        folder = tmp_path / run
        folder.mkdir()
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
        env.pop("ATTNPIPE_FAULT_AT", None)
        proc = subprocess.run([sys.executable, "-c", DRIVER, str(ROOT), str(tiny_model_dir("gpt2")), str(texts)],
                              cwd=folder, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        folders.append(folder)
    files = [sorted(p.relative_to(f).as_posix() for p in f.rglob("*") if p.is_file()) for f in folders]
    assert files[0] == files[1]
    suffixes = {Path(name).suffix for name in files[0]}
    assert {".h5", ".json", ".png", ".svg", ".pdf", ".csv", ".parquet", ".html", ".md", ".txt"} <= suffixes
    differing = [name for name in files[0] if (folders[0] / name).read_bytes() != (folders[1] / name).read_bytes()]
    assert not differing, f"{len(differing)} of {len(files[0])} files differ between runs: {differing}"
    assert len(files[0]) >= 25
