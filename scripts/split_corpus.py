#!/usr/bin/env python3
"""Split a corpus (.jsonl with id/text, .txt one text per line, .csv/.tsv) into JSONL shards.

Writes OUT_DIR/shard_000.jsonl ... one file per SHARD_SIZE texts, each line {"id", "text"}.
"""
from __future__ import annotations

import argparse
import csv
import json
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
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--name", required=True, help="corpus name (used for ids of .txt/.csv rows)")
    ap.add_argument("--shard-size", type=int, required=True)
    ap.add_argument("--text-column", default="text")
    ap.add_argument("--id-column", default=None)
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.shard_size < 1:
        print("error: --shard-size must be at least 1", file=sys.stderr)
        return 2
    rows = read_corpus(args.corpus, args.name, args.text_column, args.id_column)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for k, start in enumerate(range(0, len(rows), args.shard_size)):
        chunk = rows[start : start + args.shard_size]
        out = args.out_dir / f"shard_{k:03d}.jsonl"
        out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in chunk), encoding="utf-8")
    print(f"{len(rows)} texts -> {(len(rows) + args.shard_size - 1) // args.shard_size} shards")
    return 0


if __name__ == "__main__":
    sys.exit(main())
