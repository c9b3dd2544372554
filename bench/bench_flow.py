#!/usr/bin/env python3
"""Attention flow cost: one text of random attention, one output row ([CLS]), timed once per
networkx max-flow algorithm. The figures in docs/METRICS.md ("Attention flow") come from here.

    python bench/bench_flow.py                                   # 128 tokens x 12 layers x 12 heads
    python bench/bench_flow.py --tokens 32 --algorithms shortest_augmenting_path edmonds_karp
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from networkx.algorithms import flow as nxflow

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from attnpipe.analyze.flow import attention_flow  # noqa: E402

ALGORITHMS = ("shortest_augmenting_path", "preflow_push", "boykov_kolmogorov", "edmonds_karp")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="sequence length n (default: 128)")
    parser.add_argument("--layers", type=int, default=12, help="number of layers (default: 12)")
    parser.add_argument("--heads", type=int, default=12, help="heads per layer, fused by their mean (default: 12)")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=["shortest_augmenting_path"],
                        help="networkx max-flow functions to time (default: shortest_augmenting_path)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the attention (default: 0)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    logits = rng.normal(size=(args.layers, args.heads, args.tokens, args.tokens)) * 2
    attention = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)  # (L, H, n, n)
    reference = None
    for name in args.algorithms:
        start = time.perf_counter()
        flows = attention_flow(attention, query="cls", flow_func=getattr(nxflow, name))
        seconds = time.perf_counter() - start
        agrees = "" if reference is None else f", max |diff| vs first {np.abs(flows - reference).max():.1e}"
        reference = flows if reference is None else reference
        print(f"{name}: {args.tokens} tokens x {args.layers} layers, [CLS] row: {seconds:.1f} s{agrees}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
