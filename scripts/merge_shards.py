#!/usr/bin/env python3
"""Merge attention .h5 shards (same model, written by extract_attention.py) into one file, in order."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import h5py
import numpy as np

SKIP = {"parity_max_abs_diff", "parity_hidden_max_abs_diff"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("shards", nargs="+", type=Path)
    ap.add_argument("--output-file", type=Path, required=True)
    args = ap.parse_args(argv)
    tmp = args.output_file.with_name(args.output_file.name + ".tmp")
    args.output_file.parent.mkdir(parents=True, exist_ok=True)
    ids: list[str] = []
    parity = []
    with h5py.File(tmp, "w", track_order=True) as out:
        texts = out.create_group("texts")
        first_attrs = None
        for shard in args.shards:
            with h5py.File(shard, "r") as src:
                attrs = dict(src.attrs)
                if first_attrs is None:
                    first_attrs = attrs
                else:
                    for key in ("model", "weights_sha256", "layers", "heads", "dtype", "max_length"):
                        if not np.array_equal(np.asarray(attrs[key]), np.asarray(first_attrs[key])):
                            print(f"error: {shard} differs from {args.shards[0]} in {key}", file=sys.stderr)
                            tmp.unlink(missing_ok=True)
                            return 2
                parity.append(float(attrs.get("parity_max_abs_diff", np.nan)))
                for name in src["texts"]:
                    src.copy(src["texts"][name], texts, name=f"{len(ids):08d}")
                    ids.append(src["texts"][name].attrs["id"])
        out.create_dataset("ids", data=ids, dtype=h5py.string_dtype())
        for key, value in first_attrs.items():
            out.attrs[key] = value
        if "parity_max_abs_diff" in first_attrs:
            out.attrs["parity_max_abs_diff"] = np.nan if all(np.isnan(parity)) else np.nanmax(parity)
    os.replace(tmp, args.output_file)
    print(f"{len(args.shards)} shards, {len(ids)} texts -> {args.output_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
