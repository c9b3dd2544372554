#!/usr/bin/env python3
"""Write a probe corpus of repeated random token sequences (prefix + A + A), seeded.

Tokens are drawn from the ordinary tokens of a tokenizer the model has (its folder, or a tokenizer
folder); each text is the tokenizer's decoding and encodes back to the drawn ids. The output is a
normal corpus JSONL file ({"id", "text", "prefix", "length"}) for extract_attention.py --texts-file
or a workflow config; analyze_attention.py circuits reads the detectors on it.

    # the word-level tokenizer of configs/induction.yaml and its probe corpus
    python scripts/make_probe_corpus.py --tokenizer data/probes/tokenizer --new-tokenizer 50 \
        --num-texts 32 --seed 1 --output-file data/probes/induction.jsonl
    # probes for any model, from its own tokenizer
    python scripts/make_probe_corpus.py --tokenizer path/to/model --output-file probes.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's attnpipe (not pip-installed)

from attnpipe.errors import AttnpipeError, run_cli  # noqa: E402
from attnpipe.extract.probes import ProbeSpec, probe_records, word_tokenizer  # noqa: E402
from attnpipe.store.atomic import atomic_path  # noqa: E402


def span(flag: str, value: str) -> tuple[int, int]:
    low, _, high = value.partition("-")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise AttnpipeError(f"{flag} {value!r} is not MIN-MAX (two whole numbers) or N") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--tokenizer", type=Path, required=True, metavar="DIR",
                    help="a model or tokenizer folder whose tokenizer draws and writes the texts")
    ap.add_argument("--new-tokenizer", type=int, default=None, metavar="N",
                    help="first write a word-level tokenizer of N tokens (w0..wN-1, BOS <|endoftext|>) to --tokenizer")
    ap.add_argument("--output-file", "--output_file", type=Path, required=True, metavar="JSONL",
                    help="the corpus to write")
    ap.add_argument("--num-texts", type=int, default=32, metavar="N", help="texts to draw (default: 32)")
    ap.add_argument("--length", default="10-40", metavar="MIN-MAX",
                    help="tokens of the repeated sequence A (default: 10-40)")
    ap.add_argument("--prefix", default="0-10", metavar="MIN-MAX",
                    help="random tokens before the first A (default: 0-10)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)
    (min_length, max_length), (min_prefix, max_prefix) = span("--length", args.length), span("--prefix", args.prefix)
    spec = ProbeSpec(args.num_texts, args.seed, min_length, max_length, min_prefix, max_prefix)
    spec.check()
    import transformers

    if args.new_tokenizer is not None:
        word_tokenizer(args.new_tokenizer).save_pretrained(args.tokenizer)
    elif not args.tokenizer.is_dir():
        raise AttnpipeError(f"--tokenizer {args.tokenizer}: no such folder")
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    records = probe_records(tokenizer, spec)
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.output_file) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    print(f"wrote {len(records)} probe texts to {args.output_file}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
