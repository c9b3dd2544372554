#!/usr/bin/env python3
"""Split a corpus (.jsonl with id/text, .txt one text per line, .csv/.tsv) into JSONL shards.

Writes OUT_DIR/shard_000.jsonl ... one file per SHARD_SIZE texts, each line {"id", "text"};
with --shard K --output-file F, only shard K (the workflow makes one job per shard). The corpus
is read by attnpipe.extract.corpus, the reader extract_attention.py uses, so a text keeps the id
it has there (its own id, else line-N / row-N) and the same checks (UTF-8, JSON, empty texts,
unique ids) apply.

    python scripts/split_corpus.py data/demo_corpus.jsonl --shard-size 100 --out-dir shards
    python scripts/split_corpus.py data/demo_corpus.jsonl --shard-size 100 --shard 1 \
        --output-file shards/shard_001.jsonl
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's attnpipe (not pip-installed)

from attnpipe.errors import AttnpipeError, run_cli  # noqa: E402
from attnpipe.extract import corpus  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("corpus", type=Path, help="corpus file: .jsonl (id, text), .txt, .csv or .tsv")
    ap.add_argument("--name", default=None,
                    help="corpus name; accepted for older command lines, ids no longer depend on it")
    ap.add_argument("--shard-size", type=int, required=True, help="texts per shard")
    ap.add_argument("--text-column", default="text", help=".csv/.tsv column holding the text")
    ap.add_argument("--id-column", default=None, help=".csv/.tsv column holding the text id")
    ap.add_argument("--skip-empty", action="store_true", help="leave out empty texts instead of refusing the corpus")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--out-dir", type=Path, help="write every shard here as shard_NNN.jsonl")
    where.add_argument("--output-file", type=Path, help="write only shard --shard to this file")
    ap.add_argument("--shard", type=int, default=None, help="with --output-file: the shard index")
    args = ap.parse_args(argv)
    if args.shard_size < 1:
        raise AttnpipeError("--shard-size must be at least 1")
    texts = corpus.read_corpus(args.corpus, args.text_column, args.id_column, skip_empty=args.skip_empty).texts
    count = corpus.num_shards(len(texts), args.shard_size)
    if args.output_file is not None:
        if args.shard is None or not 0 <= args.shard < count:
            raise AttnpipeError(f"--shard must be given and within 0..{count - 1} ({len(texts)} texts)")
        chunk = corpus.shard(texts, args.shard_size, args.shard)
        corpus.write_jsonl(args.output_file, chunk)  # complete or absent
        print(f"shard {args.shard}: {len(chunk)} texts")
        return 0
    for index in range(count):
        corpus.write_jsonl(args.out_dir / f"shard_{index:03d}.jsonl", corpus.shard(texts, args.shard_size, index))
    print(f"{len(texts)} texts -> {count} shards")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
