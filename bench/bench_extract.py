#!/usr/bin/env python3
"""Extraction speed, side by side in one process on one corpus: ratios, not absolute times.

    (a) attnpipe end to end: our pass, all layers and heads, HDF5 float16, file closed on disk
    (b) transformers eager, output_attentions=True, length-sorted batches, nothing stored
    (c) transformers SDPA without attention: the cost of just running the model
    (d) seed 001's approach: one text at a time, padded to 256, eager with attentions

Each is run --repeats times in turn (a, b, c, d, a, b, ...) and the median is reported, so that
load on a shared machine hits all four alike.

    python bench/bench_extract.py                       # demo corpus, packaged MiniLM
    python bench/bench_extract.py --texts-file my.txt --limit 512 --repeats 5
    python bench/bench_extract.py --smoke               # a few texts, proves the script runs
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attnpipe import corpus  # noqa: E402
from attnpipe.extract import ExtractConfig, extract, length_sorted_batches  # noqa: E402
from attnpipe.loading import default_model_dir  # noqa: E402


def hf_forward(model, tokenizer, texts: list[str], batch_size: int, max_length: int, attentions: bool) -> None:
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    with torch.inference_mode():
        for batch in length_sorted_batches(lengths, batch_size):
            enc = tokenizer([texts[i] for i in batch], padding=True, truncation=True,
                            max_length=max_length, return_tensors="pt")
            out = model(**enc, output_attentions=attentions)
            if attentions:
                assert out.attentions, "eager model returned no attentions"


def seed_001(model, tokenizer, texts: list[str]) -> None:
    with torch.inference_mode():
        for text in texts:
            enc = tokenizer([text], padding="max_length", truncation=True, max_length=256, return_tensors="pt")
            model(**enc, output_attentions=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts-file", type=Path, default=ROOT / "data" / "demo_corpus.jsonl",
                        help="corpus to run (default: the demo corpus)")
    parser.add_argument("--model_dir", type=Path, default=None, help="model folder (default: packaged MiniLM)")
    parser.add_argument("--limit", type=int, default=256, help="use the first N texts (default: 256)")
    parser.add_argument("--batch-size", type=int, default=32, help="texts per batch (default: 32)")
    parser.add_argument("--max-length", type=int, default=128, help="truncate to N tokens (default: 128)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of a-b-c-d; medians reported")
    parser.add_argument("--smoke", action="store_true", help="8 texts, 1 round: only proves it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.limit, args.repeats = 8, 1

    import transformers

    transformers.utils.logging.set_verbosity_error()
    model_dir = args.model_dir or default_model_dir()
    texts = corpus.read_texts_file(args.texts_file)[: args.limit]
    strings = [t.text for t in texts]
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    eager = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    sdpa = transformers.AutoModel.from_pretrained(model_dir, attn_implementation="sdpa").eval()

    with tempfile.TemporaryDirectory() as tmp:
        def ours() -> None:
            extract(ExtractConfig(texts=tuple(texts), output=Path(tmp) / "bench.h5", model_dir=model_dir,
                                  batch_size=args.batch_size, max_length=args.max_length,
                                  dtype="float16", progress=False))

        runs = {
            "(a) attnpipe -> HDF5 float16": ours,
            "(b) HF eager + attentions, sorted": lambda: hf_forward(eager, tokenizer, strings, args.batch_size, args.max_length, True),
            "(c) HF sdpa, no attentions": lambda: hf_forward(sdpa, tokenizer, strings, args.batch_size, args.max_length, False),
            "(d) seed 001: one text, pad 256": lambda: seed_001(eager, tokenizer, strings),
        }
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        stored = (Path(tmp) / "bench.h5").stat().st_size

    median = {name: statistics.median(values) for name, values in times.items()}
    a = median["(a) attnpipe -> HDF5 float16"]
    print(f"{len(texts)} texts, batch {args.batch_size}, max length {args.max_length}, "
          f"{torch.get_num_threads()} threads, {args.repeats} round(s); median seconds; "
          "speed ratio = other time / (a) time (> 1: (a) is faster)")
    for name, seconds in median.items():
        print(f"  {name:36s} {seconds:8.3f} s   speed of (a) relative: {seconds / a:6.2f}")
    print(f"  HDF5 float16 file: {stored / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
