#!/usr/bin/env python3
"""Cost of the runtime guards (attnpipe.extract.guards.check_attention) next to the forward pass they check.

On the packaged MiniLM and the demo corpus, each length-sorted batch is run through our forward
pass and then through the guard, alternately, --repeats times; the report gives the median time of
each per batch summed over the corpus and their ratio. The guard runs on every extraction, so this
ratio is its overhead on the model computation (writing the file adds more time, not counted).

    python bench/bench_guards.py                 # whole demo corpus, max length 128, batch 32
    python bench/bench_guards.py --limit 64 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attnpipe.extract import corpus
from attnpipe.extract import guards  # noqa: E402
from attnpipe.extract.batching import length_sorted_batches  # noqa: E402
from attnpipe.extract.loading import default_model_dir, load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts-file", type=Path, default=ROOT / "data" / "demo_corpus.jsonl",
                        help="corpus to run (default: the demo corpus)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N texts")
    parser.add_argument("--max-length", type=int, default=128, help="truncate texts (default 128)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default 32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is kept")
    args = parser.parse_args(argv)

    texts = [t.text for t in corpus.read_texts_file(args.texts_file)][: args.limit]
    model = load_model(default_model_dir(), torch.device("cpu"))
    enc = model.tokenizer(texts, truncation=True, max_length=args.max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    forward_s, guard_s = [], []
    for _ in range(args.repeats):
        fwd = chk = 0.0
        for batch in length_sorted_batches(lengths, args.batch_size):
            padded = model.tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                                     max_length=args.max_length, return_tensors="pt")
            with torch.inference_mode():
                start = time.perf_counter()
                out = model.family.forward(model.weights, dict(padded))
                middle = time.perf_counter()
                guards.check_attention(out.attentions["self"], [lengths[i] for i in batch], [str(i) for i in batch],
                                       causal=guards.is_causal(model.model_type))
                end = time.perf_counter()
            fwd, chk = fwd + middle - start, chk + end - middle
        forward_s.append(fwd)
        guard_s.append(chk)
    f, g = statistics.median(forward_s), statistics.median(guard_s)
    print(f"{len(texts)} texts, {sum(lengths)} tokens, batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"forward pass (median of {args.repeats}): {f:.3f} s; guards: {g:.3f} s; overhead {100 * g / f:.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
