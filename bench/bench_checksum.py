#!/usr/bin/env python3
"""What the checksums cost a reader: the same corpus file with and without them.

One file is written by H5Writer (fletcher32 on every chunk, a CRC-32 on every string dataset and
on each group's string attributes: attnpipe.store.checksum); a copy holds the same bytes of values
with neither (rewritten through h5py without fletcher32 and without the crc attributes, as a file
of a version before the checksums reads). Both are read through the library's reader, alternately
in each of --rounds rounds: every text whole (attention, tokens, ids: what metrics/summary do), and
--picks random (text, layer, head) matrices (`AttentionFile.head`, what attnpipe.open(...).attention
does). The report gives the median time of each and the ratio checked / unchecked.

    python bench/bench_checksum.py                   # 300 texts of 8-48 tokens, 6 layers x 12 heads
    python bench/bench_checksum.py --smoke           # seconds: a small file, 3 rounds
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import h5py  # noqa: E402
import numpy as np  # noqa: E402

from attnpipe.store import H5Writer, Provenance, Storage, TextAttention, open_attention  # noqa: E402
from attnpipe.store.checksum import ATTRS_CRC_ATTR, CRC_ATTR  # noqa: E402


def item(index: int, n: int, layers: int, heads: int, rng: np.random.Generator) -> TextAttention:
    logits = rng.normal(size=(layers, heads, n, n)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # (layer, head, query, key)
    tokens = tuple(["[CLS]"] + [f"w{i}" for i in range(n - 2)] + ["[SEP]"])
    return TextAttention(
        id=f"t{index}", text=" ".join(tokens[1:-1]), tokens=tokens, token_ids=np.arange(n),
        special_tokens_mask=np.array([True] + [False] * (n - 2) + [True]), offsets=np.zeros((n, 2), np.int64),
        word_ids=np.array([-1] + list(range(n - 2)) + [-1]), truncated=False, num_tokens_untruncated=n,
        attention=probs.astype(np.float32),
    )


def write_corpus(path: Path, texts: int, layers: int, heads: int, longest: int, storage: Storage) -> None:
    rng = np.random.default_rng(0)
    meta = Provenance(model="/models/bench", model_type="bert", weights_sha256="0" * 64,
                      weight_files=("model.safetensors",), num_layers=layers, num_heads=heads,
                      layers=tuple(range(layers)), heads=tuple(range(heads)), dtype=storage.dtype,
                      compute_dtype="float32", method="manual", max_length=64, trust_remote_code=False,
                      library_versions={"attnpipe": "bench"})
    with H5Writer(path, texts, storage.dtype, storage) as writer:
        for i in range(texts):
            writer.write(i, item(i, int(rng.integers(8, longest + 1)), layers, heads, rng))
        writer.finish(meta)


def without_checksums(src: Path, dst: Path) -> None:
    """The same file with every dataset rewritten without fletcher32 and no crc attributes."""
    with h5py.File(src, "r") as fin, h5py.File(dst, "w", track_order=True, libver=("v110", "v110")) as fout:
        def copy_attrs(a, b):
            for key, value in a.attrs.items():
                if key not in (CRC_ATTR, ATTRS_CRC_ATTR):
                    b.attrs[key] = value

        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                copy_attrs(obj, fout.require_group(name))
                return
            options = {}
            if obj.chunks is not None:
                options = dict(chunks=obj.chunks, compression=obj.compression,
                               compression_opts=obj.compression_opts, shuffle=obj.shuffle)
            fout.create_dataset(name, data=obj[()], dtype=obj.dtype, **options)
            copy_attrs(obj, fout[name])
        copy_attrs(fin, fout)
        fin.visititems(visit)


def read_all(path: Path) -> float:
    start = time.perf_counter()
    with open_attention(path) as f:
        for index in range(len(f)):
            f[index]
    return time.perf_counter() - start


def read_picks(path: Path, picks: list[tuple[int, int, int]]) -> float:
    start = time.perf_counter()
    with open_attention(path) as f:
        for text, layer, head in picks:
            f.head(text, layer, head)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--texts", type=int, default=300, help="texts in the corpus file (default 300)")
    parser.add_argument("--longest", type=int, default=48, help="tokens of the longest text (8 or more; default 48)")
    parser.add_argument("--layers", type=int, default=6, help="layers per text (default 6)")
    parser.add_argument("--heads", type=int, default=12, help="heads per layer (default 12)")
    parser.add_argument("--compression", choices=["gzip", "lzf", "none"], default="gzip",
                        help="storage of the file (default gzip, the CLI's default)")
    parser.add_argument("--picks", type=int, default=1000, help="random (text, layer, head) reads per round")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are reported")
    parser.add_argument("--smoke", action="store_true", help="a small file and 2 rounds (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.texts, args.layers, args.heads, args.longest, args.picks, args.rounds = 12, 2, 3, 16, 50, 2

    with tempfile.TemporaryDirectory() as folder:
        checked, plain = Path(folder) / "checked.h5", Path(folder) / "plain.h5"
        write_corpus(checked, args.texts, args.layers, args.heads, args.longest,
                     Storage(dtype="float16", compression=args.compression))
        without_checksums(checked, plain)
        rng = random.Random(0)
        picks = [(rng.randrange(args.texts), rng.randrange(args.layers), rng.randrange(args.heads))
                 for _ in range(args.picks)]
        times = {(kind, name): [] for kind in ("whole", "picks") for name in ("checked", "plain")}
        for round_ in range(args.rounds):
            order = [("checked", checked), ("plain", plain)]
            for name, path in order if round_ % 2 == 0 else order[::-1]:  # alternate who goes first
                times["whole", name].append(read_all(path))
                times["picks", name].append(read_picks(path, picks))
        med = {key: statistics.median(values) for key, values in times.items()}
        print(f"{args.texts} texts, {args.layers} layers x {args.heads} heads, float16 {args.compression}; "
              f"file {checked.stat().st_size / 1e6:.1f} MB with checksums, {plain.stat().st_size / 1e6:.1f} MB "
              f"without; medians of {args.rounds} interleaved rounds; load average {os.getloadavg()[0]:.2f}")
        print(f"{'read':<34} {'checked s':>10} {'unchecked s':>12} {'ratio':>7}")
        for kind, label in (("whole", "every text whole"), ("picks", f"{args.picks} random single matrices")):
            c, p = med[kind, "checked"], med[kind, "plain"]
            print(f"{label:<34} {c:>10.3f} {p:>12.3f} {c / p:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
