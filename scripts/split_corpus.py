#!/usr/bin/env python3
"""Split a corpus (.jsonl with id/text, .txt one text per line, .csv/.tsv) into JSONL shards.

Writes OUT_DIR/shard_000.jsonl ... one file per SHARD_SIZE texts, each line {"id", "text"};
with --shard K --output-file F, only shard K (the workflow makes one job per shard).

    python scripts/split_corpus.py data/demo_corpus.jsonl --name demo --shard-size 100 --out-dir shards
    python scripts/split_corpus.py data/demo_corpus.jsonl --name demo --shard-size 100 --shard 1 \
        --output-file shards/shard_001.jsonl
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path


def read_corpus(path: Path, name: str, text_column: str, id_column: str | None) -> list[dict]:
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix == ".jsonl":
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                obj = json.loads(line)
                rows.append({"id": str(obj.get("id", f"{name}-{i:06d}")), "text": obj["text"]})
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for i, row in enumerate(reader):
                text_id = row[id_column] if id_column else f"{name}-{i:06d}"
                rows.append({"id": str(text_id), "text": row[text_column]})
    else:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                rows.append({"id": f"{name}-{i:06d}", "text": line})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("corpus", type=Path, help="corpus file: .jsonl (id, text), .txt, .csv or .tsv")
    ap.add_argument("--name", required=True, help="corpus name (used for ids of .txt/.csv rows)")
    ap.add_argument("--shard-size", type=int, required=True, help="texts per shard")
    ap.add_argument("--text-column", default="text", help=".csv/.tsv column holding the text")
    ap.add_argument("--id-column", default=None, help=".csv/.tsv column holding the text id")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", type=Path, help="write every shard here as shard_NNN.jsonl")
    where.add_argument("--output-file", type=Path, help="write only shard --shard to this file")
    ap.add_argument("--shard", type=int, default=None, help="with --output-file: the shard index")
    args = ap.parse_args(argv)
    if args.shard_size < 1:
        print("error: --shard-size must be at least 1", file=sys.stderr)
        return 2
    rows = read_corpus(args.corpus, args.name, args.text_column, args.id_column)
    if args.output_file is not None:
        n = (len(rows) + args.shard_size - 1) // args.shard_size
        if args.shard is None or not 0 <= args.shard < n:
            print(f"error: --shard must be given and within 0..{n - 1} ({len(rows)} texts)", file=sys.stderr)
            return 2
        chunk = rows[args.shard * args.shard_size : (args.shard + 1) * args.shard_size]
        args.output_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.output_file.with_name(f".{args.output_file.name}.tmp")
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk), encoding="utf-8")
        os.replace(tmp, args.output_file)  # complete or absent
        print(f"shard {args.shard}: {len(chunk)} texts")
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(rows), args.shard_size)):
        chunk = rows[start : start + args.shard_size]
        out = args.out_dir / f"shard_{k:03d}.jsonl"
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk), encoding="utf-8")
    print(f"{len(rows)} texts -> {(len(rows) + args.shard_size - 1) // args.shard_size} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
