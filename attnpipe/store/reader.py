"""The attention file reader: one AttentionFile for HDF5 and JSON, texts read on demand.

Every text returned is validated (attnpipe.store.validate.check_text); HDF5 attention is
inflated by attnpipe.store.codec.read_whole. The layout read is the spec in attnpipe.store.format.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store.codec import decode, read_whole
from attnpipe.store.format import (FORMAT_NAME, TARGET_GRADIENTS, TEXT_ATTRIBUTIONS, ImageInfo, MissingAttribute,
                                   ROW_SUM_TOL, UINT8_ROW_SLACK, Storage, TargetAttention, TextAttention, or_none,
                                   provenance_from_attrs, storage_from_attrs, attr_int)
from attnpipe.store.json_file import read_json, text_from_json
from attnpipe.store.packed import PACKED_SCHEMA_VERSION, PackedReader
from attnpipe.store.validate import (check_attrs_crc, check_bool, check_chunks_written, check_hard_links,
                                     check_ids, check_links_below, check_local_data, check_meta, check_rows,
                                     check_strings_crc, check_text, check_text_id, check_version_value,
                                     error_reason, file_identity)

# What every text group holds (datasets, then attributes): the reader checks they are there.
TEXT_DATASETS = ("text", "attention", "token_ids", "tokens", "special_tokens_mask", "offsets", "word_ids")
TEXT_ATTRS = ("id", "truncated", "num_tokens_untruncated")
# What AttentionFile.metric_inputs reads (and checks) for the metrics' fast path.
METRIC_DATASETS = ("attention", "tokens", "special_tokens_mask")


@dataclass(frozen=True)
class MetricWindow:
    """The metric inputs of k texts back to back (AttentionFile.metric_windows), T tokens in all.

    Checked as metric_inputs checks: each text's attention is (L, H, n, n) for its n tokens and
    its rows are probabilities."""

    positions: np.ndarray  # (k,) int64: each text's position in the caller's indices
    lengths: np.ndarray  # (k,) int64: each text's number of tokens n
    values: np.ndarray  # (V,) float32: each text's (L, H, n, n) attention in C order, back to back
    value_offsets: np.ndarray  # (k + 1,) int64: text i is values[value_offsets[i]:value_offsets[i + 1]]
    tokens: tuple[str, ...]  # the distinct token strings of the window
    token_codes: np.ndarray  # (T,) int64: every text's tokens, back to back, as indices into `tokens`
    special: np.ndarray  # (T,) bool: every text's special_tokens_mask, back to back


def windows_of_texts(inputs: Iterable[tuple], max_values: int) -> Iterator[MetricWindow]:
    """MetricWindows of at most max_values attention values (or one text) from per-text
    (position, id, tokens, special_tokens_mask or None, float32 attention), as iter_metric_inputs
    yields them already checked: for files read one text at a time."""
    positions, attention, codes, special = [], [], [], []
    distinct: dict[str, int] = {}
    size = 0
    for pos, _, tokens, mask, matrix in inputs:
        if positions and size + matrix.size > max_values:
            yield _window(positions, attention, codes, special, distinct)
            positions, attention, codes, special, distinct, size = [], [], [], [], {}, 0
        positions.append(pos)
        attention.append(np.asarray(matrix, np.float32).reshape(-1))
        codes.append(np.array([distinct.setdefault(tok, len(distinct)) for tok in tokens], np.int64))
        special.append(np.zeros(len(tokens), bool) if mask is None else np.asarray(mask, bool))
        size += matrix.size
    if positions:
        yield _window(positions, attention, codes, special, distinct)


def _window(positions, attention, codes, special, distinct) -> MetricWindow:
    return MetricWindow(positions=np.array(positions, np.int64), lengths=np.array([len(c) for c in codes], np.int64),
                        values=np.concatenate(attention),
                        value_offsets=np.concatenate(([0], np.cumsum([a.size for a in attention]))).astype(np.int64),
                        tokens=tuple(distinct), token_codes=np.concatenate(codes), special=np.concatenate(special))


def distinct_tokens(token_bytes: np.ndarray, token_nbytes: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """Tokens stored as UTF-8 bytes back to back, cut by token_nbytes (T,) -> (the distinct token
    strings in order of first appearance, (T,) each token's index into them), decoding each
    distinct token once.

    Each token is read as little-endian 8-byte words, zero beyond its end (a token holds no NUL:
    the writer refuses them, so a token of up to 8 bytes is its one word). Longer tokens are
    hashed over their words; tokens grouped by hash are checked word for word against their
    group's first token, and a collision falls back to sorting the tokens as byte strings.
    Hashing (pandas.factorize) costs about a third of np.unique's sort of the padded strings."""
    count = len(token_nbytes)
    if count == 0:
        return (), np.zeros(0, np.int64)
    nbytes = np.asarray(token_nbytes, np.int64)
    starts = np.cumsum(nbytes) - nbytes  # (T,)
    words = _token_words(token_bytes, starts, nbytes)  # (T, W) uint64
    import pandas as pd  # lazy: only metric windows need it
    codes = pd.factorize(_word_hashes(words), sort=False)[0].astype(np.int64)
    first = _first_occurrences(codes)  # (D,) each distinct key's first token
    if words.shape[1] > 1 and not (words[first][codes] == words).all():
        return _distinct_by_sort(token_bytes, starts, nbytes)
    data = np.asarray(token_bytes, np.uint8).tobytes()
    ends = starts + nbytes
    tokens = tuple(data[s:e].decode() for s, e in zip(starts[first].tolist(), ends[first].tolist()))
    return tokens, codes


def _token_words(token_bytes: np.ndarray, starts: np.ndarray, nbytes: np.ndarray) -> np.ndarray:
    """(T, W) uint64: each token's bytes as ceil(longest / 8) little-endian words, zero beyond its end."""
    num_words = max(1, -(-int(nbytes.max()) // 8))
    source = np.zeros(len(token_bytes) + 8 * num_words + 8, np.uint8)  # every 8-byte read stays inside
    source[: len(token_bytes)] = token_bytes
    at = np.ndarray((len(source) - 7,), dtype="<u8", buffer=source, strides=(1,))  # the 8 bytes from each offset
    masks = np.array([(1 << (8 * k)) - 1 for k in range(9)], np.uint64)  # the low k bytes
    words = np.empty((len(nbytes), num_words), np.uint64)
    for column in range(num_words):
        words[:, column] = at[starts + 8 * column] & masks[np.clip(nbytes - 8 * column, 0, 8)]
    return words


def _word_hashes(words: np.ndarray) -> np.ndarray:
    """(T, W) uint64 words -> (T,) keys: the one word itself, or the words hashed together."""
    key = words[:, 0].copy()
    for column in range(1, words.shape[1]):
        key *= np.uint64(0x9E3779B97F4A7C15)  # Fibonacci hashing (wraps modulo 2^64)
        key ^= words[:, column]
    return key


def _first_occurrences(codes: np.ndarray) -> np.ndarray:
    """Codes numbered in order of first appearance (0, 1, ...) -> where each first appears."""
    running = np.maximum.accumulate(codes)
    new = np.empty(len(codes), bool)
    new[0] = True
    new[1:] = running[1:] > running[:-1]
    return np.flatnonzero(new)


def _distinct_by_sort(token_bytes: np.ndarray, starts: np.ndarray, nbytes: np.ndarray) -> tuple[tuple[str, ...], np.ndarray]:
    """distinct_tokens by sorting the tokens as a (T, longest) NUL-padded byte matrix (sorted order)."""
    count = len(nbytes)
    width = max(1, int(nbytes.max()))
    columns = np.arange(width)
    source = np.concatenate((np.asarray(token_bytes, np.uint8), np.zeros(1, np.uint8)))  # [-1]: padding
    inside = columns[None, :] < nbytes[:, None]  # (T, width)
    padded = source[np.where(inside, starts[:, None] + columns, len(token_bytes))]  # (T, width) uint8
    unique, codes = np.unique(padded.view(f"S{width}").reshape(count), return_inverse=True)
    return tuple(b.decode() for b in unique.tolist()), codes.reshape(count).astype(np.int64)


class AttentionFile:
    """Read-only view of an attention file (HDF5 or JSON): `meta`, `ids`, and texts by index or id.

    HDF5 texts are read on demand, so one text of a large corpus file costs only its own bytes.
    """

    in_memory = False  # a file on disk: worker processes may reopen it (store.MemoryStore: True)

    def __init__(self, path: Path | str, *, partial_rows: bool = False):
        self.path = Path(path)
        # A file of --rows cls|last holds (L, H, r, n) attention: returned only to a caller that
        # says it handles it; analyses that need whole matrices get a clear error instead.
        self.partial_rows = partial_rows
        self.storage = Storage()
        if not self.path.is_file():
            raise AttnpipeError(f"attention file not found: {self.path}")
        self._h5: h5py.File | None = None
        self._packed: PackedReader | None = None
        self._json: dict | None = None
        if self.path.suffix == ".json":
            self._open_json()
        elif self.path.suffix in (".h5", ".hdf5"):
            self._open_h5()
        else:
            raise AttnpipeError(f"unknown attention file type {self.path.suffix!r}: {self.path}")

    def _open_h5(self) -> None:
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise AttnpipeError(f"{self.path} is not a readable HDF5 file (truncated?): {err}") from err
        attrs = self._h5.attrs
        if attrs.get("format") != FORMAT_NAME:
            self.close()
            raise AttnpipeError(f"{self.path} is an HDF5 file but not an attnpipe attention file")
        try:
            version = check_version_value(self.path, attrs.get("schema_version", -1))
            check_hard_links(self.path, self._h5, "")  # before any member is opened
            if version == PACKED_SCHEMA_VERSION:  # one dispatch: version 3 lives in attnpipe.store.packed
                check_links_below(self.path, self._h5)  # a few groups: every link below them too
                self.meta = provenance_from_attrs(attrs)
                check_meta(self.path, self.meta)
                self.storage = storage_from_attrs(attrs)
                self._packed = PackedReader(self._h5, self.path)
                self.ids = self._packed.ids
                return
            missing = [name for name in ("ids", "texts") if name not in self._h5]
            if missing:
                raise AttnpipeError(f"{self.path} is a damaged attention file: it lacks {', '.join(missing)}")
            self.meta = provenance_from_attrs(attrs)
            ids = self._h5["ids"]
            check_local_data(self.path, ids, "/ids")
            self.ids = tuple(ids.asstr()[()])
            check_ids(self.path, self.ids)
            check_strings_crc(self.path, ids, self.ids, "/ids")
            check_meta(self.path, self.meta)
            check_attrs_crc(self.path, self._h5, "the file's root")  # after the named checks: a clearer message
            self.storage = storage_from_attrs(attrs)  # version 1: the defaults (gzip, all rows)
            self._texts = self._h5["texts"]  # kept: each lookup through the file costs 3x one through it
            if len(self._texts) != len(self.ids):
                raise AttnpipeError(f"{self.path} is a damaged attention file: it lists {len(self.ids)} ids "
                                    f"but holds {len(self._texts)} texts")
        except MissingAttribute as err:
            self.close()
            raise AttnpipeError(f"{self.path} is a damaged attention file: it lacks {err.args[0]}") from err
        except (KeyError, ValueError, TypeError, OSError) as err:
            self.close()
            raise AttnpipeError(f"{self.path} is a damaged attention file: {error_reason(err)}") from err
        except AttnpipeError:
            self.close()
            raise

    def _open_json(self) -> None:
        data, self.meta = read_json(self.path)
        self._json = data
        self.ids = (str(data.get("id", "text-0")),)
        try:
            self[0]  # one text: check it now, so every command fails at once on a damaged file
        except (ValueError, TypeError) as err:
            raise AttnpipeError(f"{self.path} has a damaged field: {error_reason(err)}") from err

    @property
    def identity(self) -> tuple[int, int, int, int] | None:
        """(device, inode, size, mtime) of the HDF5 file this object has open (None for JSON, which
        is read whole at open): a process that reopens the path compares it (check_same_version)."""
        if self._h5 is None:
            return None
        return file_identity(self._h5.id.get_vfd_handle())

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, text_id: str) -> int:
        try:
            return self.ids.index(text_id)
        except ValueError as err:
            raise AttnpipeError(f"text id {text_id!r} is not in {self.path}") from err

    def _position(self, key: int | str) -> int:
        """A text id or index (negative counts from the end) -> 0-based position."""
        index = self.index_of(key) if isinstance(key, str) else key
        if not -len(self) <= index < len(self):
            raise AttnpipeError(f"text index {index} is out of range: {self.path} has {len(self)} texts")
        return index % len(self)

    @property
    def metrics_only(self) -> bool:
        return self.storage.metrics_only

    def _check_matrices(self) -> None:
        """Refuse clearly when the caller would get something other than what it expects."""
        if self.storage.metrics_only:
            raise AttnpipeError(
                f"{self.path} holds per-head metrics only (--metrics-only), no attention matrices: "
                "use 'analyze_attention.py metrics' or AttentionFile.stored_metrics(), or extract again "
                "without --metrics-only"
            )
        if self.storage.rows != "all" and not self.partial_rows:
            raise AttnpipeError(
                f"{self.path} stores only the {self.storage.rows!r} query row of each matrix "
                f"(--rows {self.storage.rows}); this needs whole (query, key) matrices: extract again "
                "with --rows all (or read the kept rows with open_attention(path, partial_rows=True))"
            )

    def __getitem__(self, key: int | str) -> TextAttention:
        index = self._position(key)
        if self._json is not None:
            item = text_from_json(self.path, self._json)
        else:
            self._check_matrices()
            try:
                if self._packed is not None:
                    item = self._packed.text(index)
                    check_text(self.path, item, self.meta)
                    return item
                group = self._text_group(index)
                missing = [name for name in TEXT_DATASETS if name not in group] + [
                    name for name in TEXT_ATTRS if name not in group.attrs]
                if missing:
                    raise AttnpipeError(f"{self.path}: text {index} is damaged: it lacks {', '.join(missing)}")
                self._check_text_group(index, group)

                def optional(name: str) -> np.ndarray | None:
                    return group[name][()].astype(np.float32) if name in group else None

                item = TextAttention(
                    id=group.attrs["id"],
                    text=group["text"].asstr()[()],
                    tokens=tuple(group["tokens"].asstr()[()]),
                    token_ids=group["token_ids"][()],
                    special_tokens_mask=group["special_tokens_mask"][()],
                    offsets=group["offsets"][()],
                    word_ids=group["word_ids"][()],
                    truncated=bool(group.attrs["truncated"]),
                    num_tokens_untruncated=attr_int(group.attrs["num_tokens_untruncated"], "num_tokens_untruncated"),
                    attention=decode(read_whole(group["attention"])),
                    query_positions=group["query_positions"][()] if "query_positions" in group else None,
                    target=_target_from_h5(group) if "target" in group else None,
                    input_kind=str(group.attrs.get("input_kind", "text")),
                    image=_image_from_attrs(group.attrs),
                    attention_grad=optional("attention_grad"),
                    head_gate_grad=optional("head_gate_grad"),
                    token_grad_input=optional("token_grad_input"),
                    head_ablation=optional("head_ablation"),
                    gradient_target_value=or_none(float, group.attrs.get("gradient_target_value")),
                    gradient_target_label=or_none(int, group.attrs.get("gradient_target_label")),
                    generated=group["generated"][()].astype(bool) if "generated" in group else None,
                    generated_text=group["generated_text"].asstr()[()] if "generated_text" in group else None,
                    **{name: optional(name) for name in TEXT_ATTRIBUTIONS},  # --attribution ig
                )
            except (KeyError, ValueError, TypeError, OSError) as err:
                raise AttnpipeError(f"{self.path}: text {index} is damaged: {error_reason(err)}") from err
        check_text(self.path, item, self.meta)
        return item

    def _text_group(self, index: int):
        """Text `index`'s group, checked before anything in it is read: stored in this file (a hard
        link, with hard links only inside), its `id` the one /ids lists, its string attributes
        intact (attnpipe.store.validate)."""
        name = f"{index:08d}"
        if name not in self._texts:
            raise KeyError(f"texts/{name} is missing")
        if self._texts.id.links.get_info(name.encode()).type != h5py.h5l.TYPE_HARD:
            raise AttnpipeError(f"{self.path} is a damaged attention file: texts/{name} is a soft or external "
                                "link; attnpipe follows no links (they could point at any file)")
        group = self._texts[name]
        check_hard_links(self.path, group, f"texts/{name}")
        if "id" in group.attrs:
            check_text_id(self.path, index, group.attrs["id"], self.ids[index])
        return group

    def _check_text_group(self, index: int, group) -> None:
        """What __getitem__ reads of a text group obeys the format: data in this file, every
        chunk written, masks bool, strings matching their checksums (before they are read)."""
        check_attrs_crc(self.path, group, f"text {index}")
        where = f"text {index}'s"
        subgroups = [(group, where)]
        if "target" in group:
            check_hard_links(self.path, group["target"], f"texts/{index:08d}/target")
            subgroups.append((group["target"], f"text {index}'s target"))
        for parent, label in subgroups:
            for name, dataset in parent.items():
                if isinstance(dataset, h5py.Dataset):
                    check_local_data(self.path, dataset, f"{label} {name}")
                    if "attention" in name:
                        check_chunks_written(self.path, dataset, f"{label} {name}")
            check_bool(self.path, parent["special_tokens_mask"], f"{label} special_tokens_mask")
            for name in ("text", "tokens", "labels"):
                if name in parent:
                    check_strings_crc(self.path, parent[name], parent[name].asstr()[()], f"{label} {name}")

    def metric_inputs(self, key: int | str, to_float32=None) -> tuple[str, tuple[str, ...], np.ndarray, np.ndarray]:
        """(id, tokens, special_tokens_mask, attention) of one text: what the metrics read.

        The fast path of attnpipe.analyze.fast_metrics: three datasets instead of a whole TextAttention
        (about half the reading time on short texts), with the same shape and row-sum checks.
        `to_float32` replaces `decode` (fast_metrics converts float16 with torch, 5x numpy's speed).
        """
        if self._json is not None:
            item = self[key]
            return item.id, item.tokens, item.special_tokens_mask, item.attention
        index = self._position(key)
        self._check_matrices()
        try:
            if self._packed is not None:
                [(_, text_id, tokens, special, stored)] = next(self._packed.metric_blocks([index], 1))
                return self._checked_metric_inputs(text_id, tokens, special, (to_float32 or decode)(stored))
            group = self._text_group(index)
            try:
                text_id = group.attrs["id"]
                attention_ds, tokens_ds, special_ds = (group[name] for name in METRIC_DATASETS)
            except KeyError:  # looked up only now: per-name checks cost a fifth of a short text's read
                missing = [name for name in METRIC_DATASETS if name not in group] + (
                    [] if "id" in group.attrs else ["id"])
                if missing:
                    raise AttnpipeError(f"{self.path}: text {index} is damaged: it lacks {', '.join(missing)}") from None
                raise
            check_attrs_crc(self.path, group, f"text {index}")
            for name, dataset in zip(METRIC_DATASETS, (attention_ds, tokens_ds, special_ds)):
                check_local_data(self.path, dataset, f"text {index}'s {name}")
            check_chunks_written(self.path, attention_ds, f"text {index}'s attention")
            check_bool(self.path, special_ds, f"text {index}'s special_tokens_mask")
            tokens = tuple(tokens_ds.asstr()[()])
            check_strings_crc(self.path, tokens_ds, tokens, f"text {index}'s tokens")
            special = special_ds[()]
            attention = (to_float32 or decode)(read_whole(attention_ds))
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path}: text {index} is damaged: {error_reason(err)}") from err
        return self._checked_metric_inputs(text_id, tokens, special, attention)

    def iter_metric_inputs(self, indices, to_float32=None, max_values: int = 1 << 24):
        """(position in `indices`, id, tokens, special_tokens_mask, attention) of each text, in an
        order that reads the file front to back (version 3: blocks of texts per read; else one
        text at a time, in the order given). Checked as metric_inputs checks."""
        if self._packed is None:
            for pos, index in enumerate(indices):
                yield (pos, *self.metric_inputs(index, to_float32))
            return
        self._check_matrices()
        try:
            for block in self._packed.metric_blocks(list(indices), max_values):
                for pos, text_id, tokens, special, stored in block:
                    yield pos, *self._checked_metric_inputs(text_id, tokens, special, (to_float32 or decode)(stored))
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path} is damaged: {error_reason(err)}") from err

    def metric_windows(self, indices, to_float32=None, max_values: int = 1 << 24) -> Iterator[MetricWindow]:
        """The metric inputs of the given texts as MetricWindows of at most max_values attention
        values (or one text), checked as metric_inputs checks. Version 3: runs of neighbouring slots,
        each field read once per window and checked in bulk; other files: text by text
        (iter_metric_inputs), gathered into windows."""
        if self._packed is None:
            yield from windows_of_texts(self.iter_metric_inputs(indices, to_float32), max_values)
            return
        self._check_matrices()
        try:
            slots = self._packed.all_slots()[np.asarray(indices, dtype=np.int64)]
            order = np.argsort(slots, kind="stable")  # positions in `indices`, front of the file first
            if len(order) == 0:
                return
            offsets, _ = self._packed.matrix_index()
            runs = np.split(np.arange(len(order)), np.flatnonzero(np.diff(slots[order]) != 1) + 1)
            for run in runs:  # consecutive slots
                first = int(slots[order[run[0]]])
                start, stop = first, first + len(run)
                while start < stop:
                    end = int(np.searchsorted(offsets, offsets[start] + max_values, side="right")) - 1
                    end = min(stop, max(start + 1, end))  # values within max_values, at least one text
                    yield self._packed_window(start, end, order[run[start - first:end - first]], to_float32 or decode)
                    start = end
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path} is damaged: {error_reason(err)}") from err

    def _packed_window(self, start: int, stop: int, positions: np.ndarray, to_float32) -> MetricWindow:
        """Slots start..stop-1 as one MetricWindow: shapes, token counts and rows checked for all
        of them at once (a text that fails is checked again alone, for metric_inputs' message)."""
        raw = self._packed.metric_slots(start, stop)
        lengths = raw["token_counts"]
        num_layers, num_heads = len(self.meta.layers), len(self.meta.heads)
        expected = np.stack([np.full_like(lengths, num_layers), np.full_like(lengths, num_heads), lengths, lengths], 1)
        bad = (raw["shapes"] != expected).any(1) | (raw["special_counts"] != lengths)
        if bad.any():
            k = int(np.argmax(bad))
            raise self._shape_error(self._packed.string("id", start + k), tuple(int(x) for x in raw["shapes"][k]),
                                    int(raw["special_counts"][k]), int(lengths[k]))
        if int(raw["token_nbytes"].sum()) != len(raw["token_bytes"]) or (raw["token_nbytes"] < 0).any():
            raise AttnpipeError(f"{self.path} is damaged: slots {start}-{stop - 1}'s tokens do not add up to "
                                "their token_nbytes")
        tokens, codes = distinct_tokens(raw["token_bytes"], raw["token_nbytes"])
        values = to_float32(raw["values"])
        self._check_window_rows(values, raw["value_offsets"], lengths, start)
        return MetricWindow(positions=positions, lengths=lengths, values=values, value_offsets=raw["value_offsets"],
                            tokens=tokens, token_codes=codes, special=raw["special"].astype(bool, copy=False))

    def _check_window_rows(self, values: np.ndarray, offsets: np.ndarray, lengths: np.ndarray, first_slot: int):
        """check_rows for every text of a window, runs of equal-length texts at a time: one row sum
        per (text, layer, head, query) and one minimum; a text that fails goes to check_rows alone."""
        dtype = self.meta.dtype
        tol = ROW_SUM_TOL.get(dtype, ROW_SUM_TOL["float32"])
        bad = np.zeros(len(lengths), bool)
        edges = np.concatenate(([0], np.flatnonzero(np.diff(lengths)) + 1, [len(lengths)]))
        for a, b in zip(edges[:-1].tolist(), edges[1:].tolist()):  # texts a..b-1 have n tokens each
            n = int(lengths[a])
            if n == 0:
                continue
            rows = values[offsets[a]:offsets[b]].reshape(b - a, -1, n)  # (k, L·H·n, n)
            sums = np.einsum("kri->kr", rows)  # (k, L·H·n); NaN and Inf propagate; 5x rows.sum(-1) for short rows
            off = np.abs(sums.astype(np.float64) - 1.0)
            limit = tol + n * UINT8_ROW_SLACK if dtype == "uint8" else tol
            bad[a:b] = ~(off <= limit).all(1) | (rows.min(axis=(1, 2)) < 0)
        for k in np.flatnonzero(bad).tolist():  # check_rows raises (its sums may round otherwise at the limit)
            matrix = values[offsets[k]:offsets[k + 1]].reshape(len(self.meta.layers), len(self.meta.heads),
                                                              int(lengths[k]), int(lengths[k]))
            check_rows(self.path, lambda: self._packed.string("id", first_slot + k), matrix, self.meta.layers,
                       self.meta.heads, dtype)

    def storage_order(self) -> np.ndarray:
        """The user's indices in the order the file holds their texts (version 3: written order,
        length-sorted batches; otherwise 0..N-1): reading in this order reads the file front to back."""
        if self._packed is not None:
            return np.argsort(self._packed.all_slots(), kind="stable")
        return np.arange(len(self))

    def _checked_metric_inputs(self, text_id, tokens, special, attention):
        n = len(tokens)
        if attention.shape != (len(self.meta.layers), len(self.meta.heads), n, n) or len(special) != n:
            raise self._shape_error(text_id, attention.shape, len(special), n)
        check_rows(self.path, text_id, attention, self.meta.layers, self.meta.heads, self.meta.dtype)
        return text_id, tokens, special, attention

    def _shape_error(self, text_id: str, shape: tuple[int, ...], num_special: int, n: int) -> AttnpipeError:
        expected = (len(self.meta.layers), len(self.meta.heads), n, n)
        return AttnpipeError(f"{self.path}: text {text_id!r} has attention of shape {shape} and {num_special} "
                             f"special_tokens_mask for {n} tokens; expected {expected}")

    def corpus_array(self, name: str) -> np.ndarray | None:
        """A root dataset such as `head_importance_mean` (HDF5, version 2), or None if absent."""
        if self._h5 is None or name not in self._h5:
            return None
        return self._h5[name][()].astype(np.float32)

    def head(self, key: int | str, layer: int, head: int) -> np.ndarray:
        """One (query, key) matrix, by *stored* layer and head position, reading only its chunk.

        (n, n) float32; (r, n) for a --rows file opened with partial_rows=True.
        """
        if self._json is not None:
            return self[key].attention[layer, head]
        index = self._position(key)
        self._check_matrices()
        try:
            if self._packed is not None:  # the id only for a message: read when a check fails
                matrix, text_id = self._packed.head(index, layer, head), lambda: self.ids[index]
            else:
                group = self._text_group(index)
                check_local_data(self.path, group["attention"], f"text {index}'s attention")
                matrix = decode(group["attention"][layer, head])
                text_id = group.attrs["id"]
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path}: text {index} is damaged: {error_reason(err)}") from err
        check_rows(self.path, text_id, matrix[None, None], (self.meta.layers[layer],), (self.meta.heads[head],),
                   self.meta.dtype)
        return matrix

    def stored_metrics(self, metrics: tuple[str, ...] | None = None):
        """The per-head metrics of a --metrics-only file as corpus_metrics' long table.

        Columns text_id, layer, head (model indices), metric (categorical), value. The per-text
        causal flag the metrics were computed with is `stored_causal()`.
        """
        if not self.storage.metrics_only:
            raise AttnpipeError(f"{self.path} holds attention matrices, not stored metrics")
        group = self._h5["metrics"]
        values = group["values"][()]  # (N, L, H, M)
        names = list(group["names"].asstr()[()])
        wanted = names if metrics is None else list(metrics)
        missing = [name for name in wanted if name not in names]
        if missing:
            raise AttnpipeError(f"{self.path} does not hold the metric(s) {', '.join(missing)}; "
                                f"it holds {', '.join(names)}")
        values = values[..., [names.index(name) for name in wanted]]
        return metrics_table(self.ids, self.meta.layers, self.meta.heads, wanted, values)

    def stored_causal(self) -> np.ndarray:
        """(N,) bool: whether each text's stored metrics treated queries as seeing earlier keys only."""
        if not self.storage.metrics_only:
            raise AttnpipeError(f"{self.path} holds attention matrices, not stored metrics")
        return self._h5["metrics/causal"][()]

    def __iter__(self) -> Iterator[TextAttention]:
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self) -> AttentionFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _target_from_h5(group) -> TargetAttention:
    sub = group["target"]
    return TargetAttention(
        text=sub["text"].asstr()[()],
        tokens=tuple(sub["tokens"].asstr()[()]),
        token_ids=sub["token_ids"][()],
        special_tokens_mask=sub["special_tokens_mask"][()],
        labels=tuple(sub["labels"].asstr()[()]),
        label_ids=sub["label_ids"][()],
        truncated=bool(sub.attrs["truncated"]),
        num_tokens_untruncated=attr_int(sub.attrs["num_tokens_untruncated"], "target num_tokens_untruncated"),
        decoder_attention=decode(group["decoder_attention"][()]),
        cross_attention=decode(group["cross_attention"][()]),
        generated=sub["generated"][()].astype(bool) if "generated" in sub else None,
        **{name: group[name][()].astype(np.float32) for name in TARGET_GRADIENTS if name in group},  # --explain
    )


def _image_from_attrs(attrs) -> ImageInfo | None:
    if "image_path" not in attrs:
        return None
    path = attrs["image_path"]
    return ImageInfo(
        path=path.decode() if isinstance(path, bytes) else str(path),
        size=tuple(attr_int(x, "image_size") for x in attrs["image_size"]),
        patch_grid=tuple(attr_int(x, "patch_grid") for x in attrs["patch_grid"]),
        patch_size=attr_int(attrs["patch_size"], "patch_size"),
    )


def metrics_table(ids, layers, heads, names, values: np.ndarray, labels: dict | None = None):
    """(texts, L, H, M) per-head metric values as corpus_metrics' long table: text_id, layer,
    head (model indices), metric (categorical, in `names` order), value.

    `values` is the caller's new array: the value column takes it over (a view, not a copy of
    what may be 10^8 values); every caller builds it for the table alone. `labels`: the other
    columns, from metrics_labels with the same arguments (built beforehand, e.g. while the
    values are computed), or None to build them here."""
    import pandas as pd

    if labels is None:
        labels = metrics_labels(ids, layers, heads, names)
    if values.shape != (len(ids), len(layers), len(heads), len(names)) or len(labels["layer"]) != values.size:
        raise ValueError(f"metric values of shape {values.shape} for {len(labels['layer'])} labelled rows")
    # copy=False: each column is a new array already (or the caller's values)
    return pd.DataFrame({**labels, "value": np.ascontiguousarray(values, dtype=np.float64).reshape(-1)},
                        copy=False)


def metrics_labels(ids, layers, heads, names) -> dict:
    """Every column of metrics_table but the value, for len(ids) texts x layers x heads x names
    rows (text-major, metric last). At 10^6 texts these are gigabytes of fresh memory, which do
    not depend on the values: corpus_metrics builds them on another core while it computes."""
    import pandas as pd

    num_texts, num_layers, num_heads, num_metrics = len(ids), len(layers), len(heads), len(names)
    per_text = num_layers * num_heads * num_metrics  # rows of one text: layer-major, metric last
    layer, head, metric = np.indices((num_layers, num_heads, num_metrics)).reshape(3, per_text)

    def each_text(labels: np.ndarray) -> np.ndarray:  # one text's row labels, for every text
        return np.broadcast_to(labels, (num_texts, per_text)).reshape(-1)

    return {
        "text_id": _repeated(list(ids), per_text),
        "layer": each_text(np.asarray(layers, dtype=np.int64)[layer]),
        "head": each_text(np.asarray(heads, dtype=np.int64)[head]),
        "metric": pd.Categorical.from_codes(each_text(metric.astype(np.int8 if num_metrics < 128 else np.int64)),
                                            categories=list(names)),
    }


def _repeated(ids: list[str], times: int):
    """The text ids as a string column, each id `times` times in a row. Converting every row's
    id object, or taking rows from a column of the ids, costs more than computing the metrics of
    short texts (Arrow's take: ~4 s for 10^8 rows); with pandas' Arrow strings the column's bytes
    and offsets are built directly instead (each id's UTF-8 bytes repeated, offsets by
    arithmetic), else by take."""
    import pandas as pd

    column = pd.Series(np.asarray(ids, dtype=object)).array
    arrow = getattr(column, "_pa_array", None)  # an ArrowStringArray (pandas' str dtype with pyarrow)
    if arrow is not None:
        import pyarrow as pa

        if arrow.type != pa.large_string():
            arrow = None
    if arrow is None:
        return column.take(np.repeat(np.arange(len(ids)), times))
    encoded = [text_id.encode() for text_id in ids]  # valid UTF-8: Arrow took them as strings above
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    offsets = np.empty(len(ids) * times + 1, np.int64)  # row r of text i starts at times·start_i + r·len_i
    rows = offsets[:-1].reshape(len(ids), times)
    np.multiply(lengths[:, None], np.arange(times), out=rows)  # in place: no (texts, times) temporaries
    np.add(rows, times * (np.cumsum(lengths) - lengths)[:, None], out=rows)
    offsets[-1] = times * int(lengths.sum())
    repeated = pa.LargeStringArray.from_buffers(len(offsets) - 1, pa.py_buffer(offsets),
                                                pa.py_buffer(_repeated_bytes(encoded, lengths, times)))
    return pd.array(repeated, dtype=column.dtype)


def _repeated_bytes(encoded: list[bytes], lengths: np.ndarray, times: int) -> bytes | np.ndarray:
    """Each string's bytes `times` times in a row, string after string. Strings of one length in a
    row (most corpora's ids: a few runs) are one broadcast copy each, which, unlike joining
    bytes, lets go of the GIL: corpus_metrics builds this in a thread while it computes."""
    runs = np.flatnonzero(np.diff(lengths)) + 1
    if not encoded or len(runs) > len(encoded) // 16:  # lengths that change often: one join
        return b"".join(value * times for value in encoded)
    joined = np.frombuffer(b"".join(encoded), np.uint8)
    data = np.empty(times * len(joined), np.uint8)
    starts = np.cumsum(lengths) - lengths  # each string's first byte in `joined`
    for a, b in zip([0, *runs], [*runs, len(encoded)], strict=True):
        size, first = int(lengths[a]), int(starts[a])
        block = joined[first:first + (b - a) * size].reshape(b - a, 1, size)
        data[times * first:times * (first + (b - a) * size)].reshape(b - a, times, size)[...] = block
    return data


def open_attention(path: Path | str, *, partial_rows: bool = False) -> AttentionFile:
    """Open an attention file for reading (use in a `with` block).

    partial_rows=True: also return the (L, H, r, n) attention of --rows cls|last files.
    """
    return AttentionFile(path, partial_rows=partial_rows)
