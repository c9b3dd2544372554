"""Checks on what is read and written: versions, provenance, shapes, rows that are probabilities.

Each failure is one AttnpipeError naming the file, the text and, for attention, layer and head.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store.format import (READABLE_VERSIONS, ROW_SUM_TOL, UINT8_ROW_SLACK, Provenance,
                                   TextAttention, attr_int)


def check_version(path: Path, version: int) -> None:
    if version not in READABLE_VERSIONS:
        raise AttnpipeError(
            f"{path} has attention schema version {version}; this attnpipe reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )


def check_meta(path: Path, meta: Provenance) -> None:
    if meta.dtype not in ROW_SUM_TOL:
        raise AttnpipeError(f"{path}: unknown storage dtype {meta.dtype!r} (expected {', '.join(ROW_SUM_TOL)})")
    if not meta.layers or not meta.heads:
        raise AttnpipeError(f"{path} stores no layers or no heads")
    check_meta_rules(path, meta)


def check_rows(path: Path, text_id: str | Callable[[], str], attention: np.ndarray, layers, heads,
               dtype: str) -> None:
    """Every stored row must be finite, non-negative and sum to 1 within ROW_SUM_TOL[dtype].

    attention: (L, H, n, n) with `layers`/`heads` its model indices, used in the message (as is
    text_id, which may be a function that reads it: called only for a message).
    """
    tol = ROW_SUM_TOL.get(dtype, ROW_SUM_TOL["float32"])
    if dtype == "uint8":  # each of the row's keys is rounded by at most 0.5/255
        tol += attention.shape[-1] * UINT8_ROW_SLACK

    def where(bad: np.ndarray) -> str:
        layer, head, query = (int(v) for v in np.argwhere(bad)[0][:3])
        shown = text_id() if callable(text_id) else text_id
        return f"text {shown!r} layer {layers[layer]} head {heads[head]} query {query}"

    # Two passes over the data: row sums (NaN/Inf propagate into them) and the minimum.
    sums = attention.sum(axis=-1)  # (L, H, n); numpy's pairwise float32 sum errs ~1e-7, far below tol
    finite = np.isfinite(sums)
    if not finite.all():
        raise AttnpipeError(f"{path}: attention is NaN or infinite at {where(~finite)}")
    if attention.size and attention.min() < 0:
        raise AttnpipeError(f"{path}: attention is negative at {where((attention < 0).any(axis=-1))}")
    off = np.abs(sums.astype(np.float64) - 1.0)  # (L, H, n)
    if (off > tol).any():
        raise AttnpipeError(
            f"{path}: attention rows do not sum to 1 at {where(off > tol)} (off by {off.max():.3g}, "
            f"tolerance {tol:g} for {dtype}): not probabilities"
        )


def check_text(path: Path, item: TextAttention, meta: Provenance) -> None:
    """A text read back must be consistent: shapes agree with its tokens and the stored layers/heads."""
    n = item.num_tokens
    shape = item.attention.shape
    rows = n if item.query_positions is None else len(item.query_positions)  # --rows cls|last: 1
    expected = (len(meta.layers), len(meta.heads), rows, n)
    if shape != expected:
        raise AttnpipeError(
            f"{path}: text {item.id!r} has attention of shape {shape}; expected {expected} "
            "(stored layers x stored heads x query rows x tokens)"
        )
    for name in ("token_ids", "special_tokens_mask", "word_ids", "generated"):
        values = getattr(item, name)
        if values is not None and (np.ndim(values) != 1 or len(values) != n):
            raise AttnpipeError(f"{path}: text {item.id!r} has {np.size(values)} {name} for {n} tokens")
    if item.target is not None and item.target.generated is not None:
        t, flags = item.target.num_tokens, item.target.generated
        if np.ndim(flags) != 1 or len(flags) != t:
            raise AttnpipeError(f"{path}: text {item.id!r} has {np.size(flags)} target generated flags "
                                f"for {t} target tokens")
    check_rows(path, item.id, item.attention, meta.layers, meta.heads, meta.dtype)
    if item.target is not None:  # encoder-decoder: the decoder's and the cross-attention's rows too
        for attention in (item.target.decoder_attention, item.target.cross_attention):
            check_rows(path, item.id, attention, meta.decoder_layers, meta.decoder_heads, meta.dtype)
    check_gradient_shapes(path, item, meta)


def gradient_shape_errors(item: TextAttention, meta: Provenance | None = None) -> list[str]:
    """--explain fields, where present: each attention gradient has its attention's shape,
    gradient x input one value per token and, given the file's provenance, each head score one
    value per model head of its kind. Returns one message per field that does not fit."""
    checks = [("attention_grad", item.attention_grad, item.attention.shape),
              ("token_grad_input", item.token_grad_input, (item.num_tokens,))]
    layers = item.attention.shape[:1]
    checks += [("attention_attribution", item.attention_attribution, item.attention.shape),  # --attribution ig
               ("attribution_gap", item.attribution_gap, layers), ("attribution_delta", item.attribution_delta, layers)]
    target = item.target
    if target is not None:
        checks += [("decoder_attention_grad", target.decoder_attention_grad, target.decoder_attention.shape),
                   ("cross_attention_grad", target.cross_attention_grad, target.cross_attention.shape)]
        for kind in ("decoder", "cross"):
            attention = getattr(target, f"{kind}_attention")
            checks += [(f"{kind}_attention_attribution", getattr(target, f"{kind}_attention_attribution"),
                        attention.shape)]
            checks += [(f"{kind}_attribution_{what}", getattr(target, f"{kind}_attribution_{what}"),
                        attention.shape[:1]) for what in ("gap", "delta")]
    if meta is not None:
        heads = (meta.num_layers, meta.num_heads)
        checks += [("head_gate_grad", item.head_gate_grad, heads), ("head_ablation", item.head_ablation, heads)]
        if target is not None:
            decoder_heads = (meta.decoder_num_layers, meta.decoder_num_heads)
            checks += [(f"{kind}_head_{score}", getattr(target, f"{kind}_head_{score}"), decoder_heads)
                       for kind in ("decoder", "cross") for score in ("gate_grad", "ablation")]
    return [f"text {item.id!r} has {name} of shape {array.shape}; expected {tuple(shape)}"
            for name, array, shape in checks if array is not None and array.shape != tuple(shape)]


def check_gradient_shapes(path: Path, item: TextAttention, meta: Provenance | None = None) -> None:
    """Refuse an item whose --explain fields do not fit its attention (gradient_shape_errors):
    on read (`path` is the file) and before a writer stores it (no meta yet)."""
    errors = gradient_shape_errors(item, meta)
    if errors:
        raise AttnpipeError(f"{path}: {errors[0]}")


def check_no_nul(item: TextAttention) -> None:
    """HDF5 variable-length strings end at NUL, so a NUL would be cut silently: refuse it."""
    for what, value in (("id", item.id), ("text", item.text), *(("token", t) for t in item.tokens)):
        if "\x00" in value:
            raise AttnpipeError(
                f"text {item.id!r}: its {what} contains a NUL character (U+0000), which HDF5 strings "
                "cannot hold; remove it, or write one text to .json, which keeps it"
            )


def error_reason(err: Exception) -> str:
    """An exception as a short single-line reason for an error message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if isinstance(err, KeyError) else text[:200] or type(err).__name__


# ----------------------------------------------------------------------------- the format's own rules
# (issue 16: the reader checks every rule docs/FORMAT.md states; i22's schema-3 reader calls these too)


def check_version_value(path: Path, raw) -> int:
    """schema_version as stored must be an integer (not "2", 2.9 or true), of a readable version."""
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise AttnpipeError(f"{path} is a damaged attention file: schema_version must be an integer, "
                            f"got {_shown(raw)}")
    check_version(path, int(raw))
    return int(raw)


def _shown(value) -> str:
    text = repr(value.item() if isinstance(value, np.generic) else value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_indices(path: Path, name: str, indices, count: int, count_name: str) -> None:
    """`layers`/`heads` (and the decoder's): model indices, sorted, without repeats, within range."""
    values = list(indices)
    if not values:
        raise AttnpipeError(f"{path} stores no {name}")
    if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) for v in values):
        raise AttnpipeError(f"{path} is a damaged attention file: {name} must be integers, got {_shown(values)}")
    if values != sorted(set(values)):
        raise AttnpipeError(f"{path} is a damaged attention file: {name} {values} are not sorted without "
                            "repeats (the format stores model indices in increasing order)")
    if values[0] < 0 or values[-1] >= count:
        raise AttnpipeError(f"{path} is a damaged attention file: {name} {values} are out of range for "
                            f"{count_name} = {count}")


def check_meta_rules(path: Path, meta: Provenance) -> None:
    """The provenance's counts are positive and its stored indices obey check_indices."""
    pairs = [("layers", meta.layers, meta.num_layers, "num_layers"), ("heads", meta.heads, meta.num_heads, "num_heads")]
    if meta.decoder_layers is not None:
        pairs += [("decoder_layers", meta.decoder_layers, meta.decoder_num_layers, "decoder_num_layers"),
                  ("decoder_heads", meta.decoder_heads, meta.decoder_num_heads, "decoder_num_heads")]
    for name, indices, count, count_name in pairs:
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 1:
            raise AttnpipeError(f"{path} is a damaged attention file: {count_name} must be a positive "
                                f"integer, got {_shown(count)}")
        check_indices(path, name, indices, int(count), count_name)


def check_ids(path: Path, ids) -> None:
    """Text ids are strings, each once (a repeated id would make a text unreachable by id)."""
    seen: set[str] = set()
    for index, text_id in enumerate(ids):
        if not isinstance(text_id, str):
            raise AttnpipeError(f"{path} is a damaged attention file: id {index} is {_shown(text_id)}, not a string")
        if text_id in seen:
            raise AttnpipeError(f"{path} is a damaged attention file: text id {text_id!r} occurs more than once")
        seen.add(text_id)


def check_text_id(path: Path, index: int, stored, listed: str) -> None:
    """A text group's `id` attribute is the id /ids lists at its position."""
    if stored != listed:
        raise AttnpipeError(f"{path} is a damaged attention file: text {index} has id {_shown(stored)} "
                            f"but /ids lists {listed!r} at that position")


def check_hard_links(path: Path, group, where: str) -> None:
    """Every member of `group` is stored in this file: no soft or external links (HDF5 would
    follow them to another object or file, any path, a FIFO included), no dataset whose data
    lives in another file (external storage, virtual datasets). Call before reading a member."""
    import h5py

    bad: list[str] = []

    def visit(name: bytes, info) -> None:
        if info.type != h5py.h5l.TYPE_HARD:
            kind = "an external" if info.type == h5py.h5l.TYPE_EXTERNAL else "a soft"
            bad.append(f"{name.decode(errors='replace')} is {kind} link")

    group.id.links.iterate(visit, info=True)
    if bad:
        raise AttnpipeError(f"{path} is a damaged attention file: {where}/{bad[0]}; attnpipe follows no "
                            "links (they could point at any file)")


def check_links_below(path: Path, group) -> None:
    """check_hard_links for every group below `group`, recursively (schema version 3 has a few
    groups, so the whole file is checked at open)."""
    import h5py

    bad: list[str] = []

    def visit(name: bytes, info) -> None:
        if info.type != h5py.h5l.TYPE_HARD:
            kind = "an external" if info.type == h5py.h5l.TYPE_EXTERNAL else "a soft"
            bad.append(f"{name.decode(errors='replace')} is {kind} link")
            return 1  # the first one is enough
        return None

    group.id.links.visit(visit, info=True)
    if bad:
        raise AttnpipeError(f"{path} is a damaged attention file: /{bad[0]}; attnpipe follows no "
                            "links (they could point at any file)")


def check_local_data(path: Path, dataset, where: str) -> None:
    """A dataset's values are in this file: not external raw storage, not a virtual dataset."""
    import h5py

    plist = dataset.id.get_create_plist()
    if plist.get_layout() == h5py.h5d.VIRTUAL or plist.get_external_count() > 0:
        raise AttnpipeError(f"{path} is a damaged attention file: {where} keeps its values in another "
                            "file (external storage or a virtual dataset), which attnpipe does not read")


def check_chunks_written(path: Path, dataset, where: str) -> None:
    """Every chunk of a chunked dataset was written: a missing one would read as its fill value."""
    chunks = dataset.chunks
    if chunks is None or 0 in dataset.shape:
        return
    expected = int(np.prod([-(-size // step) for size, step in zip(dataset.shape, chunks)]))
    written = dataset.id.get_num_chunks()
    if written != expected:
        raise AttnpipeError(f"{path} is a damaged attention file: {where} has {written} of its {expected} "
                            "chunks written (the rest would read as fill values)")


def check_strings_crc(path: Path, dataset, values, where: str) -> None:
    """A string dataset's values match its `crc32` attribute, where the writer recorded one."""
    from attnpipe.store.checksum import CRC_ATTR, strings_crc32

    expected = dataset.attrs.get(CRC_ATTR)
    if expected is None:
        return  # written before checksums
    found = strings_crc32([values] if isinstance(values, str) else values)
    if found != attr_int(expected, CRC_ATTR):
        raise AttnpipeError(f"{path} is a damaged attention file: the strings of {where} do not match their "
                            "checksum (a changed byte in HDF5's string heap)")


def check_attrs_crc(path: Path, obj, where: str) -> None:
    """An object's string attributes match its `attrs_crc32`, where the writer recorded one."""
    from attnpipe.store.checksum import ATTRS_CRC_ATTR, attrs_crc_values, strings_crc32

    attrs = obj.attrs
    if ATTRS_CRC_ATTR not in attrs:
        return
    if strings_crc32(attrs_crc_values(attrs)) != attr_int(attrs[ATTRS_CRC_ATTR], ATTRS_CRC_ATTR):
        raise AttnpipeError(f"{path} is a damaged attention file: the string attributes of {where} do not "
                            "match their checksum (a changed byte in HDF5's string heap)")


def check_bool(path: Path, dataset, where: str) -> None:
    """A mask the format says is bool is stored as HDF5's bool (h5py's enum of FALSE/TRUE)."""
    if dataset.dtype != np.bool_:
        raise AttnpipeError(f"{path} is a damaged attention file: {where} is {dataset.dtype}, not bool")


# ----------------------------------------------------------------------------- one snapshot per run


def file_identity(fd: int) -> tuple[int, int, int, int]:
    """What identifies one version of an open file: (device, inode, size, mtime in ns)."""
    import os

    stat = os.fstat(fd)
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def check_same_version(path: Path, opened: tuple, expected: tuple) -> None:
    """A worker process that opened `path` again must have the version the command started with:
    a file replaced or rewritten meanwhile would mix two files' texts under one provenance."""
    if opened != expected:
        raise AttnpipeError(f"{path} changed while it was being read (replaced or rewritten: inode, size or "
                            "modification time differ); nothing was written: run the command again")
