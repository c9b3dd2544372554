"""HDF5 schema version 3, packed: every text's arrays live in a few large datasets with offsets.

Writing a text costs its bytes, not HDF5 objects: a million texts make the same ~40 datasets as
one. Texts are stored in *slots*, in the order they were written (the runner writes length-sorted
batches); `/texts/slot` maps the user's order to slots. Every dataset has the fletcher32
checksum filter, and strings are UTF-8 bytes in uint8 arrays (HDF5's variable-length strings
live in a global heap that no checksum covers). Layout (N texts, P = N slots)::

    /                        attrs as in version 2 (provenance, storage), schema_version = 3,
                             layout = "packed"
    /texts/slot              (N,) int64: the slot of text i (user's order); slots are 0..N-1
    /slots/<field>           (P, ...) one row per slot: fixed-size per-text fields
        num_tokens (int64), truncated (bool), num_tokens_untruncated (int64), input_kind_code
        (uint8: index into the root attribute input_kinds); encoder-decoder: target_num_tokens,
        target_truncated, target_num_tokens_untruncated; images: image_size (P, 2),
        patch_grid (P, 2), patch_size (P,); --explain: gradient_target_value (float64),
        gradient_target_label (int64), head_gate_grad / head_importance / head_ablation
        (P, num_layers, num_heads) float32 and their decoder_ / cross_ counterparts
    /<field>/values          (V,) 1-D, chunked: the arrays of all slots, one after the other
    /<field>/offsets         (P + 1,) int64: slot s's array is values[offsets[s]:offsets[s + 1]]
    /<field>/shape           (P, ndim) int64: its shape (values reshaped in C order)
        packed fields: attention (L, H, r, n) in the storage dtype, chunks of CHUNK_BYTES
        (a matrix of up to CHUNK_BYTES reads one or two chunks); query_positions (r,) with
        --rows cls|last; token fields (n,): token_ids int64, special_tokens_mask bool, offsets
        (n, 2) int64, word_ids int64; id, text, image_path: uint8 UTF-8 bytes; tokens: uint8,
        the tokens' UTF-8 bytes back to back, cut by token_nbytes (n,) int64; encoder-decoder:
        target_text, target_tokens + target_token_nbytes, target_token_ids,
        target_special_tokens_mask, target_labels + target_label_nbytes, target_label_ids,
        decoder_attention, cross_attention; --explain: attention_grad, decoder_attention_grad,
        cross_attention_grad (float32), token_grad_input (n,) float32
    /metrics, /head_importance_mean, ...   as in version 2

Optional fields are generic: a per-text array shaped like the attention is one more packed
field (PACKED_FIELDS / MATRIX_FIELDS), a per-token array one more packed (n, ...) field, a fixed
per-text value one more /slots dataset; readers ignore fields they do not know.

Merging version 3 shards concatenates each field's values, offsets (shifted) and slots.
"""

from __future__ import annotations

import contextlib
import functools
import math
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from attnpipe import faults
from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import AtomicFile, write_errors
from attnpipe.store.codec import ChunkRanges, decode, encode_chunk, to_storage
from attnpipe.store.format import (
    DIMS,
    FORMAT_NAME,
    TARGET_ATTRIBUTIONS,
    TEXT_ATTRIBUTIONS,
    UINT8_SCALE,
    ImageInfo,
    Provenance,
    Storage,
    StorageDtype,
    TargetAttention,
    TextAttention,
    provenance_attrs,
    plain_texts_bytes_bound,
    query_positions,
    text_bytes_bound,
)
from attnpipe.store.validate import check_gradient_shapes, check_no_nul, error_reason

PACKED_SCHEMA_VERSION = 3
CHUNK_BYTES = 1 << 18  # attention values: 256 KiB chunks (a 256-token float32 matrix spans <= 2)
SMALL_CHUNK_BYTES = 1 << 16  # everything else
INPUT_KINDS = ("text", "image", "embeddings")
# Attention-shaped fields (storage dtype for attention, decoder_attention, cross_attention;
# float32 for gradients): name -> where it lives on a TextAttention.
MATRIX_FIELDS = ("attention", "decoder_attention", "cross_attention")
GRADIENT_MATRIX_FIELDS = ("attention_grad", "decoder_attention_grad", "cross_attention_grad")
HEAD_SCORE_FIELDS = tuple(f"{prefix}head_{score}" for prefix in ("", "decoder_", "cross_")
                          for score in ("gate_grad", "importance", "ablation"))
# Metadata chunks are compressed with ISA-L level 1 (fast; they are small next to the attention).
_META_STORAGE = Storage(dtype="float32", compression="gzip", compression_level=1)


class _Appender:
    """Rows appended to one chunked dataset (first axis), written a whole chunk at a time.

    Regions are reserved in order and may be filled in any order (the streaming path fills a
    text's attention layer by layer, several texts at once); a chunk goes to the file once every
    reservation it overlaps is complete. Chunks are compressed here (codec.encode_chunk, GIL
    released; by the threads of `encode_map` when given, several chunks at once) and written, with
    their fletcher32 checksum, by write_direct_chunk in order; lzf chunks go through HDF5's own filters.
    """

    def __init__(self, group: h5py.Group, name: str, dtype, row_shape: tuple[int, ...], chunk_bytes: int,
                 storage: Storage, encode_map=map):
        self.dtype = np.dtype(dtype)
        self.row_shape = row_shape
        row_bytes = max(1, self.dtype.itemsize * math.prod(row_shape))
        self.chunk = max(1, chunk_bytes // row_bytes)  # rows per chunk
        self.storage = storage
        self.encode_map = encode_map  # map(function, chunks): a thread pool's, or the builtin
        filters = storage.h5_filters(self.dtype.itemsize)
        self.dataset = group.create_dataset(name, shape=(0, *row_shape), maxshape=(None, *row_shape), dtype=self.dtype,
                                            chunks=(self.chunk, *row_shape), **filters)
        self.buffer = np.zeros((2 * self.chunk, *row_shape), self.dtype)
        self.flushed = 0  # rows already in the file (a multiple of self.chunk until close)
        self.cursor = 0  # rows reserved
        self.open: dict[int, int] = {}  # reservation key -> first row, in reservation order

    def reserve(self, key: int, rows: int) -> int:
        start = self.cursor
        self.cursor += rows
        needed = self.cursor - self.flushed
        if needed > len(self.buffer):
            grown = np.zeros((max(needed, 2 * len(self.buffer)), *self.row_shape), self.dtype)
            grown[:len(self.buffer)] = self.buffer
            self.buffer = grown
        self.open[key] = start
        return start

    def fill(self, row: int, values: np.ndarray) -> None:
        self.buffer[row - self.flushed:row - self.flushed + len(values)] = values

    def release(self, key: int) -> None:
        del self.open[key]
        self._flush(next(iter(self.open.values())) if self.open else self.cursor)

    def append(self, values: np.ndarray) -> None:
        values = np.asarray(values, self.dtype).reshape(-1, *self.row_shape)
        if not self.open and self.cursor - self.flushed + len(values) <= len(self.buffer):  # the common case
            self.buffer[self.cursor - self.flushed:self.cursor - self.flushed + len(values)] = values
            self.cursor += len(values)
            if self.cursor - self.flushed >= self.chunk:
                self._flush(self.cursor)
            return
        row = self.reserve(-1, len(values))
        self.fill(row, values)
        self.release(-1)

    def _flush(self, limit: int) -> None:
        count = (limit - self.flushed) // self.chunk
        if count <= 0:
            return
        self._write(count * self.chunk)

    def _write(self, rows: int) -> None:
        """Write buffer[:rows] (whole chunks, the last one possibly partial at close) and shift."""
        end = self.flushed + rows
        self.dataset.resize(end, axis=0)
        if self.storage.compression == "lzf":  # HDF5 compresses (and checksums) lzf itself
            for start in range(0, rows, self.chunk):
                stop = min(start + self.chunk, rows)
                self.dataset[self.flushed + start:self.flushed + stop] = self.buffer[start:stop]
        else:
            blocks = []
            for start in range(0, rows, self.chunk):
                block = self.buffer[start:start + self.chunk]
                if start + self.chunk > rows:  # the edge chunk, stored full size
                    block = np.zeros((self.chunk, *self.row_shape), self.dtype)
                    block[:rows - start] = self.buffer[start:rows]
                blocks.append(block)
            encode = functools.partial(encode_chunk, storage=self.storage)
            # several chunks at once in encode_map's threads; the buffer shifts only once all are written
            for start, encoded in zip(range(0, rows, self.chunk),
                                      self.encode_map(encode, blocks) if len(blocks) > 1 else map(encode, blocks),
                                      strict=True):
                offset = (self.flushed + start,) + (0,) * len(self.row_shape)
                self.dataset.id.write_direct_chunk(offset, encoded)  # checksum included
        kept = self.cursor - end
        self.buffer[:kept] = self.buffer[rows:rows + kept]
        self.flushed = end

    def close(self) -> None:
        assert not self.open, "close with reservations still open"
        if self.cursor > self.flushed:
            self._write(self.cursor - self.flushed)


class _Packed:
    """One packed field: values, offsets (P + 1) and shape (P, ndim), appended per slot.

    Small arrays wait in a list and go to the appenders a few hundred slots at a time (one
    concatenation instead of three appends per text); reserved values (attention) go at once."""

    def __init__(self, file: h5py.File, name: str, dtype, ndim: int, storage: Storage, chunk_bytes: int,
                 encode_map=map):
        group = file.create_group(name)
        self.group = group
        self.dtype = np.dtype(dtype)
        self.values = _Appender(group, "values", dtype, (), chunk_bytes, storage, encode_map)
        self.offsets = _Appender(group, "offsets", np.int64, (), SMALL_CHUNK_BYTES, _META_STORAGE)
        self.offsets.append(np.zeros(1, np.int64))
        self.shape = _Appender(group, "shape", np.int64, (ndim,), SMALL_CHUNK_BYTES, _META_STORAGE)
        self.ndim = ndim
        self.total = 0
        self.pending: list[np.ndarray] = []
        self.pending_offsets: list[np.ndarray] = []  # (S,) int64 ends of the slots' arrays
        self.pending_shapes: list[np.ndarray] = []  # (S, ndim) int64

    def add(self, array: np.ndarray) -> None:
        self._index(array.shape)
        self.pending.append(array.reshape(-1))

    def add_many(self, values: np.ndarray, shapes: np.ndarray) -> None:
        """Several slots' arrays at once: their values back to back, and each one's shape (S, ndim)."""
        self._index_many(shapes)
        self.pending.append(values.reshape(-1))

    def reserve(self, key: int, shape: tuple[int, ...]) -> int:
        start = self.values.reserve(key, math.prod(shape))
        self._index(shape)
        return start

    def reserve_many(self, key: int, shapes: np.ndarray) -> np.ndarray:
        """One reservation (released under `key`) for several slots' arrays; each one's first value."""
        sizes = np.prod(shapes, axis=1, dtype=np.int64)
        start = self.values.reserve(key, int(sizes.sum()))
        self._index_many(shapes)
        return start + np.concatenate(([0], np.cumsum(sizes)[:-1]))

    def _index(self, shape) -> None:
        if len(shape) != self.ndim:
            raise ValueError(f"{self.group.name}: an array of shape {shape} in a field of {self.ndim} dimensions")
        self._index_many(np.array(shape, np.int64).reshape(1, self.ndim))

    def _index_many(self, shapes: np.ndarray) -> None:
        """Record the shapes (S, ndim) of the next S slots' arrays and where each one ends."""
        ends = self.total + np.cumsum(np.prod(shapes, axis=1, dtype=np.int64))
        if len(ends):
            self.total = int(ends[-1])
        self.pending_offsets.append(ends)
        self.pending_shapes.append(shapes)

    def flush(self) -> None:
        if self.pending:
            self.values.append(np.concatenate(self.pending) if len(self.pending) > 1 else self.pending[0])
            self.pending = []
        if self.pending_offsets:
            self.offsets.append(np.concatenate(self.pending_offsets))
            self.shape.append(np.concatenate(self.pending_shapes).reshape(-1, self.ndim))
            self.pending_offsets, self.pending_shapes = [], []

    def close(self) -> None:
        self.flush()
        for appender in (self.values, self.offsets, self.shape):
            appender.close()


class _Fixed:
    """One /slots dataset: a fixed-size value per slot, appended a few hundred slots at a time."""

    def __init__(self, group: h5py.Group, name: str, dtype, shape: tuple[int, ...]):
        self.appender = _Appender(group, name, dtype, shape, SMALL_CHUNK_BYTES, _META_STORAGE)
        self.dtype, self.shape = np.dtype(dtype), shape
        self.pending: list = []

    def flush(self) -> None:
        if self.pending:
            self.appender.append(np.asarray(self.pending, self.dtype).reshape(-1, *self.shape))
            self.pending = []

    def close(self) -> None:
        self.flush()
        self.appender.close()


@dataclass
class _Batch:
    """Texts begun together (PackedWriter.begin_batch), whose layers come one at a time."""

    indices: list[int]
    starts: np.ndarray | None  # (B,) first attention value of each text; None: begun one by one
    per_layer: np.ndarray  # (B,) values of one layer of each text (H x r x n)
    num_layers: int
    layers_written: int = 0


def _plain(item: TextAttention) -> bool:
    """A text that carries nothing but its tokens and attention (what begin_batch takes at once)."""
    return (item.target is None and item.image is None and item.attention_grad is None
            and item.generated is None and item.generated_text is None
            and all(getattr(item, name) is None for name in TEXT_ATTRIBUTIONS))


FLUSH_SLOTS = 512  # texts whose small fields wait before going to the appenders
FLUSH_BYTES = 8 << 20  # or fewer, when their arrays (gradients, decoder attention) reach this


def _strings(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Strings -> (their UTF-8 bytes back to back as uint8, each one's byte count)."""
    joined = "".join(texts)
    data = joined.encode()
    counts = np.fromiter(map(len, texts), np.int64, len(texts))  # an ASCII string's bytes are its characters
    if len(data) != len(joined):  # only the others are encoded again (str.isascii reads a flag)
        wide = np.flatnonzero(~np.fromiter(map(str.isascii, texts), bool, len(texts)))
        counts[wide] = [len(texts[i].encode()) for i in wide.tolist()]
    return np.frombuffer(data, np.uint8), counts


def _text_strings(items: Sequence[TextAttention]) -> tuple:
    """The ids, texts and tokens of texts (in order) as _strings: (bytes, each one's byte count) x 3."""
    return (_strings([item.id for item in items]), _strings([item.text for item in items]),
            _strings([t for item in items for t in item.tokens]))


class PackedWriter:
    """H5Writer's interface (begin / write_chunk / end, or write; write_metrics; finish) for
    schema version 3, and the same for whole batches (begin_batch / write_layer / end_batch: what
    the runner's sink uses). The file appears at `path` only when `finish` succeeds."""

    def __init__(self, path: Path, num_texts: int, dtype: StorageDtype, storage: Storage | None = None,
                 *, encode_threads: int = 1):
        self.path = path
        self.storage = Storage(dtype=dtype) if storage is None else storage
        if self.storage.dtype != dtype:
            raise ValueError(f"dtype {dtype} differs from storage.dtype {self.storage.dtype}")
        self.dtype = np.dtype(dtype)
        self.num_texts = num_texts
        self._atomic = AtomicFile(path)
        try:  # a signal (SIGTERM is raised as Terminated) before __enter__ returns: no file left
            with write_errors(path):
                self._file = h5py.File(self._atomic.tmp, "w", track_order=True, libver=("v110", "latest"))
                self._slots_group = self._file.create_group("slots")
        except BaseException:
            self._atomic.discard()
            raise
        self._slot_of = np.full(num_texts, -1, np.int64)
        self._packed: dict[str, _Packed] = {}
        self._fixed: dict[str, _Fixed] = {}
        self._next_slot = 0
        self._pending_bytes = 0
        self._streaming: dict[int, tuple[int, tuple[int, ...], int]] = {}  # text -> (first value, shape, left)
        self._batches: dict[int, _Batch] = {}  # first text -> a batch begun by begin_batch
        self._finished = False
        self._sums: dict[str, list[np.ndarray]] = {}
        self._schema: set[str] | None = None  # the optional fields the first text had
        # Threads that compress attention chunks side by side (the runner asks for them when the
        # writer has the machine to itself: background.py); 1: in the writer's own thread.
        self._pool = (ThreadPoolExecutor(encode_threads, thread_name_prefix="attnpipe-encode")
                      if encode_threads > 1 else None)

    # -- fields
    def _packed_field(self, name: str, dtype, ndim: int) -> _Packed:
        field = self._packed.get(name)
        if field is None:
            if self._next_slot:
                raise AttnpipeError(f"could not write {self.path}: text {self._next_slot} has a field {name!r} "
                                    "the earlier texts lack")
            matrix = name in MATRIX_FIELDS
            storage = self.storage if matrix or name in GRADIENT_MATRIX_FIELDS else _META_STORAGE
            if name in GRADIENT_MATRIX_FIELDS:  # gradients: always float32, gzip (as in version 2)
                storage = Storage(dtype="float32", compression="gzip", compression_level=1)
            field = _Packed(self._file, name, dtype, ndim, storage,
                            CHUNK_BYTES if matrix or name in GRADIENT_MATRIX_FIELDS else SMALL_CHUNK_BYTES,
                            self._pool.map if matrix and self._pool is not None else map)
            if matrix:
                field.group.attrs["dims"] = ",".join(DIMS)
                if np.dtype(dtype) == np.uint8:
                    field.group.attrs["scale"] = 1.0 / UINT8_SCALE
            self._packed[name] = field
        return field

    def _put(self, name: str, array, dtype) -> None:
        array = np.array(array, dtype)  # a copy: it waits until the next flush
        self._packed_field(name, dtype, array.ndim).add(array)
        self._pending_bytes += array.nbytes

    def _put_many(self, name: str, values: np.ndarray, shapes: np.ndarray, dtype) -> None:
        """Several slots' arrays of one field: their values back to back (a new array: it waits
        until the next flush) and each one's shape (S, ndim)."""
        values = np.asarray(values, dtype)
        self._packed_field(name, dtype, shapes.shape[1]).add_many(values, shapes)
        self._pending_bytes += values.nbytes

    def _put_fixed(self, name: str, value, dtype) -> None:
        self._put_fixed_many(name, [value], dtype)

    def _put_fixed_many(self, name: str, values: list, dtype) -> None:
        fixed = self._fixed.get(name)
        if fixed is None:
            if self._next_slot:
                raise AttnpipeError(f"could not write {self.path}: text {self._next_slot} has a field {name!r} "
                                    "the earlier texts lack")
            fixed = _Fixed(self._slots_group, name, dtype, np.shape(values[0]))
            self._fixed[name] = fixed
        fixed.pending.extend(values)

    def _put_texts(self, items: Sequence[TextAttention], strings: tuple) -> None:
        """The fields every text has (id, text, token counts and flags, tokens and their arrays),
        for texts in slot order; `strings` = _text_strings(items)."""
        (ids, id_nbytes), (texts, text_nbytes), (tokens, token_nbytes) = strings
        n = np.array([item.num_tokens for item in items], np.int64)
        self._put_many("id", ids, id_nbytes[:, None], np.uint8)
        self._put_many("text", texts, text_nbytes[:, None], np.uint8)
        self._put_fixed_many("num_tokens", n.tolist(), np.int64)
        self._put_fixed_many("truncated", [bool(item.truncated) for item in items], bool)
        self._put_fixed_many("num_tokens_untruncated", [int(item.num_tokens_untruncated) for item in items], np.int64)
        self._put_fixed_many("input_kind_code", [INPUT_KINDS.index(item.input_kind) for item in items], np.uint8)
        # each text's token bytes: differences of the running byte count at text boundaries
        # (np.add.reduceat would give a text without tokens the next text's first token)
        running = np.concatenate(([0], np.cumsum(token_nbytes)))[np.concatenate(([0], np.cumsum(n)))]
        self._put_many("tokens", tokens, np.diff(running)[:, None], np.uint8)
        self._put_many("token_nbytes", token_nbytes, n[:, None], np.int64)
        for name, dtype in (("token_ids", np.int64), ("special_tokens_mask", bool)):
            self._put_many(name, np.concatenate([np.asarray(getattr(item, name), dtype) for item in items]),
                           n[:, None], dtype)
        self._put_many("offsets", np.concatenate([np.asarray(item.offsets, np.int64).reshape(-1, 2) for item in items]),
                       np.column_stack([n, np.full_like(n, 2)]), np.int64)
        self._put_many("word_ids", np.concatenate([np.asarray(item.word_ids, np.int64) for item in items]),
                       n[:, None], np.int64)

    def _check_schema(self, fields: set[str], item_id: str) -> None:
        """The optional fields of every text are the first text's."""
        if self._schema is None:
            self._schema = fields
        elif fields != self._schema:
            raise AttnpipeError(f"could not write {self.path}: text {item_id!r} has the fields "
                                f"{sorted(fields ^ self._schema)} unlike the texts before it")

    def _take_slots(self, indices: Sequence[int]) -> None:
        """The next slots go to these texts; small fields go to the appenders every FLUSH_SLOTS
        slots (or FLUSH_BYTES of them)."""
        before = self._next_slot
        self._slot_of[list(indices)] = np.arange(before, before + len(indices))
        self._next_slot += len(indices)
        if self._next_slot // FLUSH_SLOTS != before // FLUSH_SLOTS or self._pending_bytes > FLUSH_BYTES:
            self._pending_bytes = 0
            for field in (*self._packed.values(), *self._fixed.values()):
                field.flush()

    # -- H5Writer's interface
    def begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        check_no_nul(item)
        if not 0 <= index < self.num_texts or self._slot_of[index] >= 0:
            raise ValueError(f"text index {index} is out of range or written twice")
        self._atomic.check_room(text_bytes_bound(item, num_layers, num_heads, self.dtype.itemsize, self.storage.rows),
                                unwritten=self._pending_bytes)
        with write_errors(self.path):
            fields = self._begin(index, item)
            if not self.storage.metrics_only:
                rows = query_positions(self.storage.rows, item.num_tokens)
                if item.query_positions is not None and not np.array_equal(item.query_positions, rows):
                    raise ValueError(f"query positions {item.query_positions} do not match rows={self.storage.rows}")
                shape = (num_layers, num_heads, len(rows), item.num_tokens)
                start = self._packed_field("attention", self.dtype, 4).reserve(index, shape)
                self._streaming[index] = (start, shape, math.prod(shape))
                if self.storage.rows != "all":
                    self._put("query_positions", rows, np.int64)
                fields.add("attention")
                faults.point("write")
            self._check_schema(fields, item.id)
            self._take_slots([index])
            if index in self._streaming and self._streaming[index][2] == 0:
                self.end(index)

    def begin_batch(self, indices: Sequence[int], items: Sequence[TextAttention], num_layers: int,
                    num_heads: int) -> None:
        """`begin` for a batch of texts, in order: their slots follow one another and their attention
        is one reservation, filled by `write_layer` and released by `end_batch`. Texts that carry
        more than their tokens (a target, an image, gradients, generated text) go one by one."""
        if not all(map(_plain, items)):
            for index, item in zip(indices, items, strict=True):
                self.begin(index, item, num_layers, num_heads)
            if not self.storage.metrics_only:  # one layer of a text: heads x stored rows x tokens
                self._batches[indices[0]] = _Batch(list(indices), None, np.array(
                    [num_heads * len(query_positions(self.storage.rows, item.num_tokens)) * item.num_tokens
                     for item in items], np.int64), num_layers)
            return
        where = np.asarray(indices, np.int64)
        if ((where < 0) | (where >= self.num_texts)).any() or (self._slot_of[where] >= 0).any() \
                or len(np.unique(where)) < len(where):
            raise ValueError(f"text indices {list(indices)[:5]} are out of range or written twice")
        strings = _text_strings(items)
        if any(0 in data for data, _ in strings):  # UTF-8 has a zero byte only for U+0000
            for item in items:
                check_no_nul(item)
        n = np.array([item.num_tokens for item in items], np.int64)
        self._atomic.check_room(plain_texts_bytes_bound(n, len(strings[1][0]) + len(strings[2][0]), num_layers,
                                                        num_heads, self.dtype.itemsize, self.storage.rows),
                                unwritten=self._pending_bytes)
        with write_errors(self.path):
            self._put_texts(items, strings)
            fields = set()
            if not self.storage.metrics_only:
                for item in items:
                    if item.query_positions is not None and not np.array_equal(
                            item.query_positions, query_positions(self.storage.rows, item.num_tokens)):
                        raise ValueError(f"query positions {item.query_positions} do not match rows={self.storage.rows}")
                rows = n if self.storage.rows == "all" else np.minimum(n, 1)
                shapes = np.column_stack([np.full_like(n, num_layers), np.full_like(n, num_heads), rows, n])
                starts = self._packed_field("attention", self.dtype, 4).reserve_many(indices[0], shapes)
                self._batches[indices[0]] = _Batch(list(indices), starts, num_heads * rows * n, num_layers)
                if self.storage.rows != "all":
                    self._put_many("query_positions", np.concatenate(
                        [query_positions(self.storage.rows, int(k)) for k in n]), rows[:, None], np.int64)
                faults.point("write", len(items))  # one arrival per text
                fields.add("attention")
            self._check_schema(fields, items[0].id)
            self._take_slots(indices)

    def _begin(self, index: int, item: TextAttention) -> set[str]:
        """Every field of `item` except its attention, in one slot; returns the fields' names."""
        self._put_texts([item], _text_strings([item]))
        fields = set()
        if item.image is not None:
            self._put("image_path", _strings([item.image.path])[0], np.uint8)
            self._put_fixed("image_size", item.image.size, np.int64)
            self._put_fixed("patch_grid", item.image.patch_grid, np.int64)
            self._put_fixed("patch_size", item.image.patch_size, np.int64)
            fields.add("image")
        if item.target is not None:
            self._write_target(item.target)
            fields.add("target")
        if item.attention_grad is not None:
            self._put_fixed("gradient_target_value", float(item.gradient_target_value), np.float64)
            self._put_fixed("gradient_target_label", int(item.gradient_target_label), np.int64)
            self._put("attention_grad", item.attention_grad, np.float32)
            self._put("token_grad_input", item.token_grad_input, np.float32)
            self._head_scores("", item.head_gate_grad, item.head_ablation)
            fields.add("gradients")
        for name in TEXT_ATTRIBUTIONS:  # --attribution ig: matrices and per-layer vectors, packed alike
            if getattr(item, name) is not None:
                self._put(name, np.asarray(getattr(item, name), np.float32), np.float32)
                fields.add(name)
        if item.generated is not None:  # generated text: which tokens the model wrote
            self._put("generated", np.asarray(item.generated).astype(bool), bool)
            fields.add("generated")
        if item.generated_text is not None:
            self._put("generated_text", _strings([item.generated_text])[0], np.uint8)
            fields.add("generated_text")
        return fields

    def _write_target(self, target: TargetAttention) -> None:
        self._put_fixed("target_num_tokens", target.num_tokens, np.int64)
        self._put_fixed("target_truncated", bool(target.truncated), bool)
        self._put_fixed("target_num_tokens_untruncated", int(target.num_tokens_untruncated), np.int64)
        self._put("target_text", _strings([target.text])[0], np.uint8)
        for name in ("tokens", "labels"):
            data, nbytes = _strings(getattr(target, name))
            self._put(f"target_{name}", data, np.uint8)
            self._put(f"target_{name[:-1]}_nbytes", nbytes, np.int64)
        self._put("target_token_ids", target.token_ids, np.int64)
        self._put("target_special_tokens_mask", target.special_tokens_mask, bool)
        self._put("target_label_ids", target.label_ids, np.int64)
        if target.generated is not None:
            self._put("target_generated", np.asarray(target.generated).astype(bool), bool)
        for name in TARGET_ATTRIBUTIONS:
            if getattr(target, name) is not None:
                self._put(name, np.asarray(getattr(target, name), np.float32), np.float32)
        for name in ("decoder_attention", "cross_attention"):
            self._put(name, to_storage(getattr(target, name), self.storage.dtype), self.dtype)
        if target.decoder_attention_grad is not None:
            for kind in ("decoder", "cross"):
                self._put(f"{kind}_attention_grad", getattr(target, f"{kind}_attention_grad"), np.float32)
                self._head_scores(f"{kind}_", getattr(target, f"{kind}_head_gate_grad"),
                                  getattr(target, f"{kind}_head_ablation"))

    def _head_scores(self, prefix: str, gate_grad: np.ndarray, ablation: np.ndarray | None) -> None:
        importance = np.abs(gate_grad)
        self._put_fixed(f"{prefix}head_gate_grad", gate_grad, np.float32)
        self._put_fixed(f"{prefix}head_importance", importance, np.float32)
        self._sums.setdefault(f"{prefix}head_importance_mean", []).append(importance.astype(np.float64))
        if ablation is not None:
            self._put_fixed(f"{prefix}head_ablation", ablation, np.float32)
            self._sums.setdefault(f"{prefix}head_ablation_mean", []).append(ablation.astype(np.float64))

    def write_chunk(self, index: int, layer: int, head: int, values: np.ndarray) -> None:
        """Values (l, h, r, n) of text `index` in the storage dtype, at (layer, head): whole heads of
        whole layers, as the streaming sink sends them (attnpipe.store.chunk_shape)."""
        start, shape, left = self._streaming[index]
        num_layers, num_heads, rows, n = shape
        if values.dtype != self.dtype or values.shape[2:] != (rows, n):
            raise ValueError(f"chunk {values.dtype} {values.shape} does not fit a {self.dtype} {shape} text")
        field = self._packed["attention"].values
        block = np.ascontiguousarray(values)
        per_head = rows * n
        if values.shape[1] == num_heads:  # whole layers: one contiguous run
            field.fill(start + layer * num_heads * per_head, block.reshape(-1))
        else:
            for k in range(values.shape[0]):
                field.fill(start + ((layer + k) * num_heads + head) * per_head, block[k].reshape(-1))
        left -= block.size
        self._streaming[index] = (start, shape, left)

    def write_layer(self, first: int, layer: int, values: np.ndarray) -> None:
        """Layer position `layer` of every text of the batch begun at `first` (begin_batch): their
        (H, r, n) values in the storage dtype, one text after the other."""
        batch = self._batches[first]
        if values.dtype != self.dtype or values.size != int(batch.per_layer.sum()):
            raise ValueError(f"layer values {values.dtype} ({values.size}) do not fit the batch's {self.dtype} "
                             f"texts ({int(batch.per_layer.sum())} values)")
        at = 0
        if batch.starts is None:  # begun one text at a time
            for index, size in zip(batch.indices, batch.per_layer.tolist(), strict=True):
                if size:  # a text without values was ended at its begin
                    self.write_chunk(index, layer, 0, values[at:at + size].reshape(1, *self._streaming[index][1][1:]))
                at += size
            return
        field = self._packed["attention"].values
        for start, size in zip((batch.starts + layer * batch.per_layer).tolist(), batch.per_layer.tolist(), strict=True):
            field.fill(start, values[at:at + size])
            at += size
        batch.layers_written += 1

    def end_batch(self, first: int) -> None:
        """The batch begun at `first` is complete: its attention may go to the file."""
        if self.storage.metrics_only:  # no attention: nothing was reserved
            return
        batch = self._batches.pop(first)
        if batch.starts is None:
            for index in batch.indices:
                self.end(index)
            return
        if batch.layers_written != batch.num_layers:
            raise RuntimeError(f"texts {batch.indices[:5]} ended with {batch.layers_written} of "
                               f"{batch.num_layers} layers written")
        with write_errors(self.path):
            self._packed["attention"].values.release(first)

    def end(self, index: int) -> None:
        """Text `index` is complete: its attention may go to the file."""
        streamed = self._streaming.pop(index, None)
        if streamed is None:
            return
        if streamed[2] != 0:
            raise RuntimeError(f"text {index} ended with {streamed[2]} attention values never written")
        with write_errors(self.path):
            self._packed["attention"].values.release(index)

    def write(self, index: int, item: TextAttention) -> None:
        """Store one whole text (float32 attention (L, H, r, n), converted here)."""
        check_gradient_shapes(self.path, item)
        num_layers, num_heads = item.attention.shape[:2]
        self.begin(index, item, num_layers, num_heads)
        if index in self._streaming:
            self.write_chunk(index, 0, 0, to_storage(item.attention, self.storage.dtype))
            self.end(index)

    def write_metrics(self, values: np.ndarray, names: tuple[str, ...], causal: np.ndarray) -> None:
        """Version 2's /metrics group, its arrays with fletcher32 (the names stay a short string
        list, read as in version 2)."""
        group = self._file.create_group("metrics")
        for name, data in (("values", np.asarray(values, dtype=np.float64)), ("causal", np.asarray(causal, bool))):
            filters = _META_STORAGE.h5_filters(data.itemsize) if data.size else {}  # fletcher32 included
            dataset = group.create_dataset(name, data=data, **filters)
            if name == "values":
                dataset.attrs["dims"] = "text,layer,head,metric"
        group.create_dataset("names", data=list(names), dtype=h5py.string_dtype())

    def finish(self, provenance: Provenance) -> None:
        if self._next_slot != self.num_texts:
            missing = np.flatnonzero(self._slot_of < 0)[:5].tolist()
            raise RuntimeError(f"texts {missing} were never written")
        if self._streaming:
            raise RuntimeError(f"texts {sorted(self._streaming)[:5]} were never ended")
        with write_errors(self.path):
            if self.num_texts and not self.storage.metrics_only and "attention" not in self._packed:
                raise RuntimeError("no attention was written")
            for field in self._packed.values():
                field.close()
            self._stop_pool()
            for fixed in self._fixed.values():
                fixed.close()
            texts = self._file.create_group("texts")
            texts.create_dataset("slot", data=self._slot_of, chunks=(max(1, min(len(self._slot_of), 1 << 13)),)
                                 if len(self._slot_of) else None,
                                 **(_META_STORAGE.h5_filters(8) if len(self._slot_of) else {}))
            for name, values in self._sums.items():
                self._file.create_dataset(name, data=np.mean(values, axis=0).astype(np.float32), fletcher32=True)
            faults.point("finish")
            if self.storage.metrics_only and "metrics" not in self._file:
                raise RuntimeError("a metrics-only file needs write_metrics before finish")
            attrs = self._file.attrs
            attrs["format"] = FORMAT_NAME
            attrs["dims"] = ",".join(DIMS)
            for key, value in provenance_attrs(provenance).items():
                attrs[key] = value
            attrs["schema_version"] = PACKED_SCHEMA_VERSION
            attrs["layout"] = "packed"
            attrs["input_kinds"] = ",".join(INPUT_KINDS)
            attrs["compression"] = self.storage.compression
            attrs["compression_level"] = self.storage.level if self.storage.compression == "gzip" else -1
            attrs["rows"] = self.storage.rows
            attrs["metrics_only"] = bool(self.storage.metrics_only)
            try:
                self._file.close()
            except RuntimeError as err:
                raise OSError(str(err)) from err
            try:
                with h5py.File(self._atomic.tmp, "r") as check:
                    complete = check.attrs.get("format") == FORMAT_NAME and len(check["texts/slot"]) == self.num_texts
            except (OSError, KeyError) as err:
                raise AttnpipeError(f"could not write {self.path}: the file did not read back ({err})") from err
            if not complete:
                raise AttnpipeError(f"could not write {self.path}: the file did not read back complete")
        faults.point("close")
        self._atomic.commit()
        self._finished = True

    def _stop_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> PackedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop_pool()
        if not self._finished:
            try:
                if self._file.id.valid:
                    with contextlib.suppress(OSError, RuntimeError, ValueError):
                        self._file.close()
            finally:  # whatever the close raised, the temporary file goes
                self._atomic.discard()


# ----------------------------------------------------------------------------- reading


class PackedIds(Sequence):
    """The ids of a version-3 file in the user's order, decoded on demand (opening stays cheap)."""

    def __init__(self, reader: PackedReader):
        self._reader = reader
        self._all: tuple[str, ...] | None = None
        self._positions: dict[str, int] | None = None

    def __len__(self) -> int:
        return self._reader.num_texts

    def __getitem__(self, key):
        if isinstance(key, slice):
            return tuple(self[i] for i in range(*key.indices(len(self))))
        if self._all is not None:
            return self._all[key]
        if not -len(self) <= key < len(self):
            raise IndexError(key)
        return self._reader.string("id", self._reader.slot(key % len(self)))

    def all(self) -> tuple[str, ...]:
        if self._all is None:
            self._all = self._reader.all_strings("id")
        return self._all

    def __iter__(self) -> Iterator[str]:
        return iter(self.all())

    def __contains__(self, text_id) -> bool:
        return text_id in self._index()

    def _index(self) -> dict[str, int]:
        if self._positions is None:
            positions: dict[str, int] = {}
            for i, text_id in enumerate(self.all()):
                positions.setdefault(text_id, i)
            self._positions = positions
        return self._positions

    def index(self, text_id, *args) -> int:
        try:
            return self._index()[text_id]
        except KeyError:
            raise ValueError(f"{text_id!r} is not in the ids") from None

    def __eq__(self, other) -> bool:
        return tuple(self) == tuple(other)

    __hash__ = None

    def __add__(self, other) -> tuple[str, ...]:  # as the tuple of ids version 2's reader gives
        return self.all() + tuple(other)

    def __radd__(self, other) -> tuple[str, ...]:
        return tuple(other) + self.all()

    def __repr__(self) -> str:
        return f"PackedIds({len(self)} ids)"


class PackedReader:
    """Read texts of a version-3 file: fields by slot, validated by the caller (check_text)."""

    def __init__(self, h5: h5py.File, path: Path):
        self.h5 = h5
        self.path = path
        self._slot_ds = h5["texts/slot"]
        self.num_texts = len(self._slot_ds)
        self._slots: np.ndarray | None = None
        self._groups = {name: h5[name] for name in h5 if isinstance(h5[name], h5py.Group)
                        and "offsets" in h5[name]}
        self._fixed = h5["slots"]
        self._open: dict[str, tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]] = {}  # see _field
        self._fixed_open: dict[str, h5py.Dataset | None] = {}
        self.ids = PackedIds(self)
        self._matrix_index: tuple[np.ndarray, np.ndarray] | None = None  # attention offsets, shapes
        self._matrix_values: ChunkRanges | None = None
        missing = [name for name in ("id", "text", "tokens", "token_nbytes", "token_ids", "special_tokens_mask",
                                     "offsets", "word_ids") if name not in self._groups]
        missing += [name for name in ("num_tokens", "truncated", "num_tokens_untruncated", "input_kind_code")
                    if name not in self._fixed]
        if missing:
            raise AttnpipeError(f"{path} is a damaged attention file: it lacks {', '.join(missing)}")

    def slot(self, index: int) -> int:
        if self._slots is not None:
            return int(self._slots[index])
        return int(self._slot_ds[index])

    def all_slots(self) -> np.ndarray:
        """/texts/slot, read and checked once: every slot in 0..N-1, none twice."""
        if self._slots is None:
            slots = np.asarray(self._slot_ds[()])
            if (slots.ndim != 1 or slots.dtype.kind not in "iu" or
                    (len(slots) and (slots.min() < 0 or slots.max() >= len(slots)
                                     or np.bincount(slots, minlength=len(slots)).max() > 1))):
                raise AttnpipeError(f"{self.path} is a damaged attention file: /texts/slot is not a permutation "
                                    f"of its {len(slots)} slots")
            self._slots = slots.astype(np.int64, copy=False)
        return self._slots

    def has(self, name: str) -> bool:
        return name in self._groups

    def _field(self, name: str) -> tuple[h5py.Dataset, h5py.Dataset, h5py.Dataset]:
        """A packed field's offsets, shape and values datasets, opened once: HDF5 keeps a chunk
        cache per open dataset, so a dataset opened again for every text inflated and checked
        its chunk again for every text (~0.5 ms a read; ~25 ms to read one whole short text)."""
        field = self._open.get(name)
        if field is None:
            group = self._groups[name]
            field = self._open[name] = (group["offsets"], group["shape"], group["values"])
        return field

    def array(self, name: str, slot: int) -> np.ndarray:
        offsets, shapes, values = self._field(name)
        start, stop = offsets[slot:slot + 2]
        shape = tuple(int(x) for x in shapes[slot])
        return values[start:stop].reshape(shape)

    def string(self, name: str, slot: int) -> str:
        return self.array(name, slot).tobytes().decode()

    def strings(self, name: str, slot: int) -> tuple[str, ...]:
        data = self.array(name, slot).tobytes()
        bounds = np.concatenate(([0], np.cumsum(self.array(f"{name[:-1]}_nbytes", slot))))
        return tuple(data[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:]))

    def all_strings(self, name: str) -> tuple[str, ...]:
        """One string per text, user's order (ids at corpus scale: one read of each dataset)."""
        group = self._groups[name]
        data = group["values"][()].tobytes()
        offsets = group["offsets"][()]
        by_slot = [data[a:b].decode() for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist())]
        return tuple(by_slot[s] for s in self.all_slots().tolist())

    def fixed(self, name: str, slot: int):
        if name not in self._fixed_open:  # opened once, as _field
            self._fixed_open[name] = self._fixed[name] if name in self._fixed else None
        dataset = self._fixed_open[name]
        return None if dataset is None else dataset[slot]

    def text(self, index: int) -> TextAttention:
        s = self.slot(index)
        kind = INPUT_KINDS[int(self.fixed("input_kind_code", s))]
        image = None
        if "image_path" in self._groups:
            image = ImageInfo(path=self.string("image_path", s),
                              size=tuple(int(x) for x in self.fixed("image_size", s)),
                              patch_grid=tuple(int(x) for x in self.fixed("patch_grid", s)),
                              patch_size=int(self.fixed("patch_size", s)))
        optional = {}
        if "attention_grad" in self._groups:
            optional = dict(attention_grad=self.array("attention_grad", s),
                            token_grad_input=self.array("token_grad_input", s),
                            head_gate_grad=self.fixed("head_gate_grad", s),
                            head_ablation=self.fixed("head_ablation", s),
                            gradient_target_value=float(self.fixed("gradient_target_value", s)),
                            gradient_target_label=int(self.fixed("gradient_target_label", s)))
        return TextAttention(
            id=self.string("id", s),
            text=self.string("text", s),
            tokens=self.strings("tokens", s),
            token_ids=self.array("token_ids", s),
            special_tokens_mask=self.array("special_tokens_mask", s),
            offsets=self.array("offsets", s),
            word_ids=self.array("word_ids", s),
            truncated=bool(self.fixed("truncated", s)),
            num_tokens_untruncated=int(self.fixed("num_tokens_untruncated", s)),
            attention=decode(self.array("attention", s)) if "attention" in self._groups else None,
            query_positions=self.array("query_positions", s) if "query_positions" in self._groups else None,
            target=self._target(s) if "target_text" in self._groups else None,
            input_kind=kind,
            image=image,
            **{name: self.array(name, s) for name in TEXT_ATTRIBUTIONS if name in self._groups},
            generated=self.array("generated", s).astype(bool) if "generated" in self._groups else None,
            generated_text=self.string("generated_text", s) if "generated_text" in self._groups else None,
            **optional,
        )

    def _target(self, s: int) -> TargetAttention:
        grads = {}
        if "decoder_attention_grad" in self._groups:
            for kind in ("decoder", "cross"):
                grads[f"{kind}_attention_grad"] = self.array(f"{kind}_attention_grad", s)
                grads[f"{kind}_head_gate_grad"] = self.fixed(f"{kind}_head_gate_grad", s)
                grads[f"{kind}_head_ablation"] = self.fixed(f"{kind}_head_ablation", s)
        return TargetAttention(
            text=self.string("target_text", s),
            tokens=self.strings("target_tokens", s),
            token_ids=self.array("target_token_ids", s),
            special_tokens_mask=self.array("target_special_tokens_mask", s),
            labels=self.strings("target_labels", s),
            label_ids=self.array("target_label_ids", s),
            truncated=bool(self.fixed("target_truncated", s)),
            num_tokens_untruncated=int(self.fixed("target_num_tokens_untruncated", s)),
            decoder_attention=decode(self.array("decoder_attention", s)),
            cross_attention=decode(self.array("cross_attention", s)),
            **{name: self.array(name, s) for name in TARGET_ATTRIBUTIONS if name in self._groups},
            generated=(self.array("target_generated", s).astype(bool) if "target_generated" in self._groups
                       else None),
            **grads,
        )

    def matrix_index(self) -> tuple[np.ndarray, np.ndarray]:
        """/attention's offsets (P + 1,) and shapes (P, 4), read once (~10 MB for a million texts;
        tens of ms) and checked: each slot's values are exactly its shape's, back to back."""
        if self._matrix_index is None:
            group = self._groups["attention"]
            offsets, shapes = np.asarray(group["offsets"][()]), np.asarray(group["shape"][()])
            count = len(self._slot_ds)
            sizes = np.prod(shapes, axis=1) if shapes.ndim == 2 else None
            if (offsets.shape != (count + 1,) or shapes.shape != (count, 4) or (shapes < 0).any()
                    or offsets[0] != 0 or not np.array_equal(np.diff(offsets), sizes)
                    or offsets[-1] != len(group["values"])):
                raise AttnpipeError(f"{self.path} is a damaged attention file: /attention's offsets and shapes "
                                    f"do not describe its {len(group['values'])} values")
            self._matrix_index = (offsets, shapes)
            self._matrix_values = ChunkRanges(group["values"])
        return self._matrix_index

    def head(self, index: int, layer: int, head: int) -> np.ndarray:
        """One stored matrix, reading only the values it spans (one or two chunks; the index
        arrays are read once, at the first call)."""
        offsets, shapes = self.matrix_index()
        s = int(self.all_slots()[index])
        num_layers, num_heads, rows, n = shapes[s].tolist()
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise IndexError(f"layer {layer}, head {head} of a ({num_layers}, {num_heads}) attention")
        first = int(offsets[s]) + (layer * num_heads + head) * rows * n
        return decode(self._matrix_values.read(first, first + rows * n).reshape(rows, n))

    def metric_slots(self, start: int, stop: int) -> dict[str, np.ndarray]:
        """The metrics' inputs of slots start..stop-1 as flat arrays, one read per field (what
        AttentionFile.metric_windows checks and hands on): attention `values` (stored dtype, the
        slots' arrays back to back) with `value_offsets` (k + 1,) from 0 and `shapes` (k, 4); the
        tokens' UTF-8 `token_bytes`, `token_nbytes` (one per token) and `token_counts` (k,);
        `special` (every token's special_tokens_mask) and `special_counts` (k,)."""
        offsets, shapes = self.matrix_index()
        out = {"values": self._matrix_values.read(int(offsets[start]), int(offsets[stop])),
               "value_offsets": offsets[start:stop + 1] - offsets[start], "shapes": shapes[start:stop]}
        for name, key, counts in (("tokens", "token_bytes", None), ("token_nbytes", "token_nbytes", "token_counts"),
                                  ("special_tokens_mask", "special", "special_counts")):
            field_offsets, _, values = self._field(name)
            bounds = np.asarray(field_offsets[start:stop + 1])
            out[key] = np.asarray(values[bounds[0]:bounds[-1]])
            if counts:  # (the tokens' bytes are cut by token_nbytes instead)
                out[counts] = np.diff(bounds)
        return out

    def metric_blocks(self, indices: Sequence[int], max_values: int) -> Iterator[list[tuple[int, str, tuple, np.ndarray,
                                                                                           np.ndarray]]]:
        """(position in `indices`, id, tokens, special_tokens_mask, stored attention) of the given
        texts, in the order they lie in the file, read a block of slots at a time (one read per
        field per block instead of a dozen per text)."""
        slots = self.all_slots()[np.asarray(indices, dtype=np.int64)]
        order = np.argsort(slots, kind="stable")
        att = self._groups["attention"]
        att_offsets = att["offsets"]
        groups = {name: self._groups[name] for name in ("id", "tokens", "token_nbytes", "special_tokens_mask")}
        pos = 0
        while pos < len(order):
            # a block of consecutive slots whose attention stays within max_values
            first_slot = int(slots[order[pos]])
            end = pos + 1
            bound = att_offsets[first_slot]
            limit = bound + max_values
            while end < len(order) and slots[order[end]] == slots[order[end - 1]] + 1 and end - pos < 4096:
                end += 1
            last_slot = int(slots[order[end - 1]])
            offs = att_offsets[first_slot:last_slot + 2]
            cut = int(np.searchsorted(offs, limit, side="right"))  # slots whose values start under the limit
            count = max(1, min(end - pos, cut - 1))
            last_slot = first_slot + count - 1
            offs = offs[:count + 1]
            values = att["values"][offs[0]:offs[-1]]
            shapes = att["shape"][first_slot:last_slot + 1]
            fields = {}
            for name, group in groups.items():
                o = group["offsets"][first_slot:last_slot + 2]
                fields[name] = (group["values"][o[0]:o[-1]], o - o[0])
            block = []
            for k in range(count):
                index_pos = int(order[pos + k])
                data, o = fields["id"]
                text_id = data[o[k]:o[k + 1]].tobytes().decode()
                data, o = fields["tokens"]
                token_bytes = data[o[k]:o[k + 1]].tobytes()
                nbytes_data, nbytes_o = fields["token_nbytes"]
                bounds = np.concatenate(([0], np.cumsum(nbytes_data[nbytes_o[k]:nbytes_o[k + 1]]))).tolist()
                tokens = tuple(token_bytes[a:b].decode() for a, b in zip(bounds[:-1], bounds[1:]))
                data, o = fields["special_tokens_mask"]
                special = data[o[k]:o[k + 1]]
                shape = tuple(int(x) for x in shapes[k])
                matrix = values[offs[k] - offs[0]:offs[k + 1] - offs[0]].reshape(shape)
                block.append((index_pos, text_id, tokens, special, matrix))
            yield block
            pos += count


def merge_packed(shards: Sequence[Path], out: h5py.File) -> list[str]:
    """Concatenate version-3 shards into `out` (an open, empty file): each packed field's values
    and shapes are appended, offsets shifted, slots renumbered; returns the ids in order.
    Values keep their stored dtype (recompressed, never re-rounded)."""
    ids: list[str] = []
    sources = [h5py.File(path, "r") for path in shards]
    try:
        first = sources[0]
        names = sorted(name for name in first if isinstance(first[name], h5py.Group) and "offsets" in first[name])
        fixed = sorted(first["slots"])
        for path, src in zip(shards, sources):
            have = sorted(name for name in src if isinstance(src[name], h5py.Group) and "offsets" in src[name])
            if have != names or sorted(src["slots"]) != fixed:
                raise AttnpipeError(f"{path} holds other fields than {shards[0]}")
        storage = Storage(dtype=str(first.attrs["dtype"]), compression=str(first.attrs.get("compression", "gzip")),
                          compression_level=(int(first.attrs["compression_level"])
                                             if first.attrs.get("compression", "gzip") == "gzip" else None))
        for name in names:
            template = first[name]
            matrix = name in MATRIX_FIELDS
            field_storage = storage if matrix else _META_STORAGE
            if name in GRADIENT_MATRIX_FIELDS:
                field_storage = Storage(dtype="float32", compression="gzip", compression_level=1)
            field = _Packed(out, name, template["values"].dtype, template["shape"].shape[1], field_storage,
                            CHUNK_BYTES if matrix or name in GRADIENT_MATRIX_FIELDS else SMALL_CHUNK_BYTES)
            for key, value in template.attrs.items():
                field.group.attrs[key] = value
            for src in sources:
                group = src[name]
                step = 1 << 22
                values = group["values"]
                for start in range(0, len(values), step):
                    field.values.append(values[start:start + step])
                offsets = group["offsets"][1:]
                field.offsets.append(offsets + field.total)
                field.total += int(offsets[-1]) if len(offsets) else 0
                field.shape.append(group["shape"][()])
            field.close()
        slots_group = out.create_group("slots")
        for name in fixed:
            template = first["slots"][name]
            appender = _Appender(slots_group, name, template.dtype, template.shape[1:], SMALL_CHUNK_BYTES,
                                 _META_STORAGE)
            for src in sources:
                appender.append(src["slots"][name][()])
            appender.close()
        slot_maps, base = [], 0
        for src in sources:
            slot_maps.append(src["texts/slot"][()] + base)
            base += len(src["texts/slot"])
        slot = np.concatenate(slot_maps) if slot_maps else np.zeros(0, np.int64)
        out.create_group("texts").create_dataset("slot", data=slot, 
                                                 chunks=(max(1, min(len(slot), 1 << 13)),) if len(slot) else None,
                                                 **(_META_STORAGE.h5_filters(8) if len(slot) else {}))
        for src in sources:
            ids += list(PackedReader(src, Path(src.filename)).ids.all())
    except (KeyError, ValueError, OSError) as err:
        raise AttnpipeError(f"could not merge {shards[0]}...: {error_reason(err)}") from err
    finally:
        for src in sources:
            src.close()
    return ids

