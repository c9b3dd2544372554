#!/usr/bin/env python3
"""Concatenate per-shard metrics.csv tables (analyze_attention.py metrics) into one CSV."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dirs", nargs="+", type=Path, help="metrics folders, in shard order")
    ap.add_argument("--output-file", type=Path, required=True)
    args = ap.parse_args(argv)
    frames = [pd.read_csv(d / "metrics.csv") for d in args.dirs]
    merged = pd.concat(frames, ignore_index=True)
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    merged.to_csv(args.output_file, index=False)
    print(f"{len(frames)} shards, {len(merged)} rows -> {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
