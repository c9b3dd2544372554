#!/usr/bin/env python3
"""Merge attention .h5 shards (same model, written by extract_attention.py) into one file, in order.

Shards of a --metrics-only run have their /metrics arrays (values, causal) concatenated in the same
order. Per-corpus means (head_importance_mean, head_ablation_mean) cannot be merged from shards and
are refused. The work is attnpipe.store.merge.merge_shards.

    python scripts/merge_shards.py s0.h5 s1.h5 --output-file merged.h5
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root: attnpipe
from attnpipe.errors import AttnpipeError  # noqa: E402
from attnpipe.store.merge import merge_shards  # noqa: E402 (no torch import)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shards", nargs="+", type=Path, help="the shards' .h5 files, in corpus order")
    ap.add_argument("--output-file", type=Path, required=True, help="the merged .h5 file to write")
    args = ap.parse_args(argv)
    try:
        count = merge_shards(args.shards, args.output_file)
    except AttnpipeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{len(args.shards)} shards, {count} texts -> {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
