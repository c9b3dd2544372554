#!/usr/bin/env python3
"""Merge attention .h5 shards (same model, written by extract_attention.py) into one file, in order.

Shards of a --metrics-only run have their /metrics arrays (values, causal) concatenated in the same
order. Per-corpus means (head_importance_mean, head_ablation_mean) cannot be merged from shards and
are refused.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root: attnpipe
from attnpipe.store import write_metrics_group  # noqa: E402 (no torch import)

SKIP = {"parity_max_abs_diff", "parity_hidden_max_abs_diff"}
# Root attributes every shard must share (those a shard may lack, such as storage attributes of
# version-1 files, are compared only when present).
SAME = ("model", "weights_sha256", "layers", "heads", "dtype", "max_length", "rows", "metrics_only")
CORPUS_MEANS = ("head_importance_mean", "head_ablation_mean")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shards", nargs="+", type=Path)
    ap.add_argument("--output-file", type=Path, required=True)
    args = ap.parse_args(argv)
    tmp = args.output_file.with_name(args.output_file.name + ".tmp")
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    parity = []
    names, values, causal = None, [], []  # /metrics of --metrics-only shards

    def fail(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        tmp.unlink(missing_ok=True)
        return 2

    with h5py.File(tmp, "w", track_order=True) as out:
        texts = out.create_group("texts")
        first_attrs = None
        for shard in args.shards:
            with h5py.File(shard, "r") as src:
                attrs = dict(src.attrs)
                if first_attrs is None:
                    first_attrs = attrs
                else:
                    for key in SAME:
                        if not np.array_equal(np.asarray(attrs.get(key, "")), np.asarray(first_attrs.get(key, ""))):
                            return fail(f"{shard} differs from {args.shards[0]} in {key}")
                means = [name for name in CORPUS_MEANS if name in src]
                if means:
                    return fail(f"{shard} holds per-corpus means ({', '.join(means)}) that shards cannot "
                                "be merged into; extract the whole corpus in one file")
                if "metrics" in src:
                    shard_names = [str(n) for n in src["metrics/names"].asstr()[()]]
                    if names is not None and shard_names != names:
                        return fail(f"{shard} stores the metrics {shard_names}, {args.shards[0]} {names}")
                    names = shard_names
                    values.append(src["metrics/values"][()])
                    causal.append(src["metrics/causal"][()])
                parity.append(float(attrs.get("parity_max_abs_diff", np.nan)))
                for name in src["texts"]:
                    src.copy(src["texts"][name], texts, name=f"{len(ids):08d}")
                    ids.append(src["texts"][name].attrs["id"])
        out.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        if values:
            write_metrics_group(out, np.concatenate(values), names, np.concatenate(causal))
        for key, value in first_attrs.items():
            out.attrs[key] = value
        if "parity_max_abs_diff" in first_attrs:
            out.attrs["parity_max_abs_diff"] = np.nan if all(np.isnan(parity)) else np.nanmax(parity)
    os.replace(tmp, args.output_file)
    print(f"{len(args.shards)} shards, {len(ids)} texts -> {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
