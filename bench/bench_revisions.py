#!/usr/bin/env python3
"""Two revisions of attnpipe side by side: the same commands, whole processes from the shell.

A restructuring must not make users wait longer. This times what a user types (start-up,
model load, extraction, file closed on disk), for the current tree and for a base revision
checked out into a temporary git worktree, in interleaved rounds (base, current, base, ...)
so that load on a shared machine hits both alike. It reports, per command, the median wall
time of each and the median of the per-round ratios (current / base; below 1 is faster), and
checks that both wrote the same attention (the largest difference over every stored matrix).

    python bench/bench_revisions.py --base main~3                 # the demo corpus, 3 rounds
    python bench/bench_revisions.py --base 57f5d24 --rounds 5 --limit 256 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Each case: a name and the extract_attention.py flags after the input and output (the input
# file and the output path are filled in per run). All write HDF5, the corpus format.
CASES = (
    ("texts float16", ("--dtype", "float16")),
    ("texts --metrics-only", ("--metrics-only",)),
    ("texts uint8 --rows cls", ("--dtype", "uint8", "--rows", "cls")),
    ("texts --verify", ("--verify",)),
)


def corpus_file(source: Path, limit: int, folder: Path) -> Path:
    """The first `limit` rows of a .jsonl corpus, as a file both revisions read."""
    rows = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][:limit]
    path = folder / "corpus.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def run(tree: Path, python: str, flags: list[str], env: dict) -> float:
    start = time.perf_counter()
    subprocess.run([python, str(tree / "extract_attention.py"), *flags], cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def largest_difference(a: Path, b: Path) -> float:
    import h5py
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from attnpipe import store

    worst = 0.0
    # through the reader: a revision before schema version 3 was the default writes version 2
    with store.open_attention(a) as fa, store.open_attention(b) as fb:
        if list(fa.ids) != list(fb.ids):
            return float("inf")
        if fa.metrics_only:
            with h5py.File(a, "r") as ra, h5py.File(b, "r") as rb:
                return float(np.nanmax(np.abs(ra["metrics/values"][()] - rb["metrics/values"][()])))
        for x, y in zip(fa, fb, strict=True):
            if x.attention.size:
                worst = max(worst, float(np.abs(x.attention.astype(np.float64) - y.attention).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--texts-file", type=Path, default=ROOT / "data" / "demo_corpus.jsonl",
                        help="a .jsonl corpus (default: the demo corpus)")
    parser.add_argument("--limit", type=int, default=256, help="use the first N texts (default: 256)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="--threads for every run (default: torch's)")
    parser.add_argument("--python", default=sys.executable, help="the interpreter for both trees")
    args = parser.parse_args(argv)

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory(prefix="bench-revisions-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base), args.base], cwd=ROOT, check=True)
        try:
            corpus = corpus_file(args.texts_file, args.limit, tmp)
            threads = ["--threads", str(args.threads)] if args.threads else []
            print(f"base {args.base} vs current tree; {args.limit} texts of {args.texts_file.name}; "
                  f"{args.rounds} interleaved rounds; load {os.getloadavg()[0]:.2f}")
            print(f"{'command':<26} {'base s':>8} {'current s':>10} {'ratio':>7} {'max |diff|':>11}")
            results = {}
            for name, flags in CASES:
                times = {"base": [], "current": []}
                outputs = {}
                for _ in range(args.rounds):
                    for label, tree in (("base", base), ("current", ROOT)):
                        out = tmp / f"{label}.h5"
                        out.unlink(missing_ok=True)
                        cmd = ["--texts-file", str(corpus), "--output_file", str(out), "-q", *threads, *flags]
                        times[label].append(run(tree, args.python, cmd, env))
                        outputs[label] = out
                ratios = [c / b for b, c in zip(times["base"], times["current"])]
                diff = largest_difference(outputs["base"], outputs["current"])
                b, c, r = (statistics.median(v) for v in (times["base"], times["current"], ratios))
                results[name] = {"base_s": b, "current_s": c, "ratio": r, "max_abs_diff": diff}
                print(f"{name:<26} {b:>8.2f} {c:>10.2f} {r:>7.3f} {diff:>11.2e}")
            print(f"load after: {os.getloadavg()[0]:.2f}")
            print(json.dumps(results))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
