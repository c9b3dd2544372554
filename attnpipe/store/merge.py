"""Merging HDF5 shards of one corpus (same model, same storage) into one attention file, in order.

The workflow extracts a corpus in shards and merges them here. Shards of schema version 3 (the
default) are concatenated field by field (store.packed.merge_packed); the merged file has their
version. Version-2 shards: text groups are copied as they
are (no re-encoding), renumbered in the order of the shards; ids follow. Shards of a
--metrics-only run have their /metrics arrays (values, causal) concatenated in the same order.
Per-corpus means (head_importance_mean, head_ablation_mean) cannot be merged from shards and
are refused. The merged file appears only when complete (attnpipe.store.atomic).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import atomic_path
from attnpipe.store.packed import PACKED_SCHEMA_VERSION, merge_packed
from attnpipe.store.writer import checked_dataset, seal_attrs, write_metrics_group

# Parity figures are per shard: the merged file keeps the largest (NaN when none was verified).
PARITY_ATTR = "parity_max_abs_diff"
# Root attributes every shard must share (those a shard may lack, such as storage attributes of
# version-1 files, are compared only when present).
SAME = ("model", "weights_sha256", "layers", "heads", "dtype", "max_length", "rows", "metrics_only")
CORPUS_MEANS = ("head_importance_mean", "head_ablation_mean", "decoder_head_importance_mean",
                "decoder_head_ablation_mean", "cross_head_importance_mean", "cross_head_ablation_mean")


def merge_shards(shards: Sequence[Path], output: Path) -> int:
    """Write the texts of `shards`, in order, to `output`; returns the number of texts.

    Root attributes are the first shard's (parity: the largest of all shards). Shards that differ
    in any of SAME, or store different metrics, are refused with one AttnpipeError; nothing is written.
    """
    output.parent.mkdir(parents=True, exist_ok=True)
    versions = set()
    for shard in shards:
        with _open_shard(shard) as src:
            versions.add(int(src.attrs.get("schema_version", 1)) == PACKED_SCHEMA_VERSION)
    if len(versions) > 1:
        raise AttnpipeError(f"{', '.join(map(str, shards))} mix schema version 3 (packed) with older layouts: "
                            "extract every shard with the same --schema-version")
    packed = versions == {True}
    ids: list[str] = []
    parity = []
    names, values, causal = None, [], []  # /metrics of --metrics-only shards
    with atomic_path(output) as tmp, h5py.File(tmp, "w", track_order=True, libver=("v110", "latest")) as out:
        texts = None if packed else out.create_group("texts")
        first_attrs = None
        for shard in shards:
            with _open_shard(shard) as src:
                attrs = dict(src.attrs)
                if first_attrs is None:
                    first_attrs = attrs
                else:
                    for key in SAME:
                        if not np.array_equal(np.asarray(attrs.get(key, "")), np.asarray(first_attrs.get(key, ""))):
                            raise AttnpipeError(f"{shard} differs from {shards[0]} in {key}")
                means = [name for name in CORPUS_MEANS if name in src]
                if means:
                    raise AttnpipeError(f"{shard} holds per-corpus means ({', '.join(means)}) that shards cannot "
                                        "be merged into; extract the whole corpus in one file")
                if "metrics" in src:
                    shard_names = [str(n) for n in src["metrics/names"].asstr()[()]]
                    if names is not None and shard_names != names:
                        raise AttnpipeError(f"{shard} stores the metrics {shard_names}, {shards[0]} {names}")
                    names = shard_names
                    values.append(src["metrics/values"][()])
                    causal.append(src["metrics/causal"][()])
                parity.append(float(attrs.get(PARITY_ATTR, np.nan)))
                if packed:
                    continue
                for name in src["texts"]:
                    src.copy(src["texts"][name], texts, name=f"{len(ids):08d}")
                    ids.append(src["texts"][name].attrs["id"])
        if packed:  # version 3: every field's arrays concatenated (attnpipe.store.packed)
            ids = merge_packed(shards, out)
        else:
            checked_dataset(out, "ids", data=ids, dtype=h5py.string_dtype())
        if values:
            write_metrics_group(out, np.concatenate(values), names, np.concatenate(causal))
        for key, value in first_attrs.items():
            out.attrs[key] = value
        if PARITY_ATTR in first_attrs:
            out.attrs[PARITY_ATTR] = np.nan if all(np.isnan(parity)) else np.nanmax(parity)
        seal_attrs(out)  # the CRC of the root's string attributes, as the writer records it
    return len(ids)


def _open_shard(path: Path) -> h5py.File:
    if not path.is_file():
        raise AttnpipeError(f"shard not found: {path}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise AttnpipeError(f"{path} is not a readable HDF5 file (truncated?): {err}") from err
