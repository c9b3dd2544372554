"""The attention file formats: one writer and one reader for each, and their spec.

Dimension order is always (layer, head, query, key): rows are queries, columns are keys.
Only real tokens are stored: no padding, so a text of n tokens has (L, H, n, n) attention,
where L and H count the *stored* layers and heads (their model indices are in `layers`/`heads`).

HDF5 (`.h5`, many texts), schema version 2 (version 1 files, which lack the storage attributes
below, read as float32/float16, gzip, all rows)::

    /                      attrs: format = "attnpipe-attention", schema_version = 1,
                                  dims = "layer,head,query,key", and the provenance below
    /ids                   (N,) utf-8 strings: text ids in the user's order
    /texts/<i>             one group per text, i = 0..N-1 zero-padded to 8 digits, user's order
        attrs              id, truncated (bool), num_tokens_untruncated (int)
        text               scalar utf-8 string: the text as given
        attention          (L, H, n, n) float32, float16 or uint8 (see `dtype` below), or
                           (L, H, r, n) when only r query rows are kept (`rows` below);
                           chunks of at most CHUNK_TARGET_BYTES (1 MiB), see `chunk_shape`:
                           (l, H, r, n), l whole layers, when a layer fits, else (1, h, r, n),
                           h of the heads (l, h divide L, H), so one matrix is read without
                           the rest; compression per `compression`
                           (gzip: with shuffle); attribute dims = "layer,head,query,key"
        query_positions    (r,) int64, only when `rows` is not "all": the query position of
                           each stored row (cls: [0]; last: [n - 1])
        token_ids          (n,) int64
        tokens             (n,) utf-8 strings, as the tokenizer spells them ("##ing", "Ġthe")
        special_tokens_mask (n,) bool: [CLS], [SEP], <s>, ... are True
        offsets            (n, 2) int64: character span [start, end) of each token in `text`;
                           (0, 0) for special tokens; all -1 for slow tokenizers, which give none
        word_ids           (n,) int64: index of the word each sub-word belongs to; -1 for special
                           tokens (and everywhere for slow tokenizers)

Provenance attributes (root of the HDF5 file, `metadata` object of the JSON file):
model (folder as given), model_type, weights_sha256 (sha256 over each weight file's name then
bytes, files sorted by name), weight_files (JSON-encoded list in HDF5), num_layers / num_heads (of the model), layers / heads (stored model indices),
dtype (storage dtype), compute_dtype, method ("manual": our forward pass), max_length,
parity_max_abs_diff and parity_hidden_max_abs_diff (largest difference from transformers'
eager attention measured by --verify; NaN in HDF5 / null in JSON when not verified),
trust_remote_code, library_versions (python, torch, transformers, numpy, h5py, attnpipe: a
JSON-encoded string in HDF5, an object in JSON). `layers`/`heads` are sorted, without repeats.

Storage attributes (schema version 2, root of the HDF5 file; read by `AttentionFile.storage`):
compression ("gzip", "lzf" or "none"), compression_level (gzip level 0-9; -1 otherwise),
rows ("all", "cls" or "last": which query rows `attention` holds), metrics_only (bool).
dtype "uint8" stores v = round(p * 255) (UINT8_SCALE): the reader returns p = v / 255 as float32,
at most 0.5/255 ≈ 0.00196 from the computed probability; the attention dataset carries the
attribute scale = 1/255 for plain-h5py readers.

Metrics only (`metrics_only` true, written by `extract_attention.py --metrics-only`): the texts
keep every dataset except `attention`, and the per-head metrics of attnpipe.metrics are stored
instead, as one array that the reader turns into the long table of `corpus_metrics`::

    /metrics/values        (N, L, H, M) float64: text (user's order) x stored layer x stored
                           head x metric; attribute dims = "text,layer,head,metric"
    /metrics/names         (M,) utf-8 strings: the metric names, in order
    /metrics/causal        (N,) bool: whether each text's queries saw only earlier keys

JSON (`.json`, one text), seed 001's format with extra keys::

    {"tokens": [...], "text": "...", "attention_matrices": [layer][head][query][key],
     "id": "...", "token_ids": [...], "special_tokens_mask": [...], "offsets": [[s, e], ...],
     "word_ids": [...], "truncated": false, "num_tokens_untruncated": n,
     "layers": [...], "heads": [...], "metadata": {"format": ..., "schema_version": 2, ...}}

`tokens` and `attention_matrices` hold real tokens only (seed 001 kept [PAD] entries in
`tokens`; a single text needs no padding, so there is none to flag).

JSON holds float32 or float16 values of all rows; uint8, row subsets and metrics-only are
HDF5-only.

Writes are atomic: a temporary file in the output folder, renamed over the target when complete.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np

from attnpipe.atomic import AtomicFile, atomic_path, check_writable
from attnpipe.errors import AttnpipeError

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMAT_NAME = "attnpipe-attention"
DIMS = ("layer", "head", "query", "key")
OUTPUT_SUFFIXES = (".json", ".h5", ".hdf5")
StorageDtype = Literal["float32", "float16", "uint8"]
Compression = Literal["gzip", "lzf", "none"]
RowSelection = Literal["all", "cls", "last"]
STORAGE_DTYPES = ("float32", "float16", "uint8")
COMPRESSIONS = ("gzip", "lzf", "none")
ROW_SELECTIONS = ("all", "cls", "last")
UINT8_SCALE = 255  # uint8 storage: v = round(p * 255), read back as p = v / 255
DEFAULT_GZIP_LEVEL = 4  # h5py's own default (and what schema version 1 files were written with)
# gzip level when none is given, per dtype. A float's low mantissa byte is incompressible noise,
# so level 4 saves ~1 % over level 1 at ~1.6x the time (float16: 1.651 vs 1.669 bytes/value on
# MiniLM, bench/bench_extract.py); 8-bit values gain ~8 % from level 4.
DEFAULT_GZIP_LEVELS = {"float32": 1, "float16": 1, "uint8": DEFAULT_GZIP_LEVEL}
CHUNK_TARGET_BYTES = 1 << 20  # chunks of at most ~1 MiB: one matrix read costs one small chunk


@dataclass(frozen=True)
class Provenance:
    model: str
    model_type: str
    weights_sha256: str
    weight_files: tuple[str, ...]
    num_layers: int
    num_heads: int
    layers: tuple[int, ...]
    heads: tuple[int, ...]
    dtype: StorageDtype
    compute_dtype: str
    method: str
    max_length: int
    trust_remote_code: bool
    library_versions: dict[str, str] = field(default_factory=dict)
    parity_max_abs_diff: float | None = None
    parity_hidden_max_abs_diff: float | None = None
    schema_version: int = SCHEMA_VERSION


@dataclass(frozen=True)
class TextAttention:
    id: str
    text: str
    tokens: tuple[str, ...]
    token_ids: np.ndarray  # (n,) int64
    special_tokens_mask: np.ndarray  # (n,) bool
    offsets: np.ndarray  # (n, 2) int64
    word_ids: np.ndarray  # (n,) int64, -1 = not part of a word
    truncated: bool
    num_tokens_untruncated: int
    attention: np.ndarray  # (L, H, n, n) float32: stored layers x stored heads x query x key
    # The query position of each stored row when only some rows are kept (--rows cls|last),
    # attention is then (L, H, r, n); None means every row, in order.
    query_positions: np.ndarray | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


def check_output_path(path: Path) -> None:
    """Fail before any work if the output cannot be written: suffix, folder, permissions."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise AttnpipeError(
            f"unknown output type {path.suffix or '(none)'!r} for {path}: "
            "use .json (one text) or .h5 (any number of texts)"
        )
    check_writable(path)


def _provenance_attrs(prov: Provenance) -> dict:
    attrs = asdict(prov)
    attrs["library_versions"] = json.dumps(prov.library_versions, sort_keys=True)
    attrs["weight_files"] = json.dumps(list(prov.weight_files))
    for key in ("parity_max_abs_diff", "parity_hidden_max_abs_diff"):
        attrs[key] = math.nan if attrs[key] is None else float(attrs[key])
    attrs["layers"] = np.asarray(prov.layers, dtype=np.int64)
    attrs["heads"] = np.asarray(prov.heads, dtype=np.int64)
    return attrs


def _provenance_from_attrs(attrs) -> Provenance:
    def get(key):
        value = attrs[key]
        return value.decode() if isinstance(value, bytes) else value

    def maybe(value) -> float | None:
        return None if math.isnan(value) else float(value)

    return Provenance(
        model=get("model"),
        model_type=get("model_type"),
        weights_sha256=get("weights_sha256"),
        weight_files=tuple(json.loads(get("weight_files"))),
        num_layers=int(get("num_layers")),
        num_heads=int(get("num_heads")),
        layers=tuple(int(x) for x in get("layers")),
        heads=tuple(int(x) for x in get("heads")),
        dtype=get("dtype"),
        compute_dtype=get("compute_dtype"),
        method=get("method"),
        max_length=int(get("max_length")),
        trust_remote_code=bool(get("trust_remote_code")),
        library_versions=json.loads(get("library_versions")),
        parity_max_abs_diff=maybe(get("parity_max_abs_diff")),
        parity_hidden_max_abs_diff=maybe(get("parity_hidden_max_abs_diff")),
        schema_version=int(get("schema_version")),
    )


@dataclass(frozen=True)
class Storage:
    """How attention is stored in an HDF5 file (root attributes of schema version 2)."""

    dtype: StorageDtype = "float32"
    compression: Compression = "gzip"
    compression_level: int | None = None  # gzip only: 0-9, None = DEFAULT_GZIP_LEVELS[dtype]
    rows: RowSelection = "all"
    metrics_only: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise AttnpipeError(f"--dtype {self.dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        if self.compression not in COMPRESSIONS:
            raise AttnpipeError(f"--compression {self.compression!r} is not one of {', '.join(COMPRESSIONS)}")
        if self.rows not in ROW_SELECTIONS:
            raise AttnpipeError(f"--rows {self.rows!r} is not one of {', '.join(ROW_SELECTIONS)}")
        if self.compression_level is not None:
            if self.compression != "gzip":
                raise AttnpipeError(f"--compression-level applies to gzip only, not {self.compression}")
            if not 0 <= self.compression_level <= 9:
                raise AttnpipeError(f"--compression-level {self.compression_level} is out of range: use 0-9")

    @property
    def level(self) -> int:
        return DEFAULT_GZIP_LEVELS[self.dtype] if self.compression_level is None else self.compression_level


def query_positions(rows: RowSelection, n: int) -> np.ndarray:
    """The query positions kept for a text of n tokens: all, [0] (cls) or [n - 1] (last)."""
    if rows == "all" or n == 0:
        return np.arange(n, dtype=np.int64)
    return np.array([0 if rows == "cls" else n - 1], dtype=np.int64)


def to_storage(attention: np.ndarray, dtype: StorageDtype) -> np.ndarray:
    """float32 probabilities -> the stored dtype (uint8: round(p * 255), half to even)."""
    if dtype == "uint8":
        return np.round(np.asarray(attention, dtype=np.float32) * np.float32(UINT8_SCALE)).astype(np.uint8)
    return np.asarray(attention).astype(np.dtype(dtype), copy=False)


def decode(stored: np.ndarray) -> np.ndarray:
    """Stored values -> float32 probabilities (uint8: v / 255)."""
    if stored.dtype == np.uint8:
        return stored.astype(np.float32) / np.float32(UINT8_SCALE)
    return stored.astype(np.float32, copy=False)


def _largest_divisor(total: int, unit_bytes: int) -> int:
    """The largest divisor d of `total` with d * unit_bytes <= CHUNK_TARGET_BYTES (at least 1)."""
    return max(d for d in range(1, total + 1) if total % d == 0 and (d == 1 or d * unit_bytes <= CHUNK_TARGET_BYTES))


def chunk_shape(num_layers: int, num_heads: int, num_rows: int, num_keys: int,
                itemsize: int) -> tuple[int, int, int, int]:
    """Chunks of one text's (L, H, r, n) attention, at most ~CHUNK_TARGET_BYTES each.

    Whole layers (several, for short texts: bigger chunks compress better) when one layer fits,
    else part of one layer's heads; layer and head counts divide L and H, so every chunk is full.
    """
    per_head = max(1, num_rows * num_keys * itemsize)
    if num_heads * per_head <= CHUNK_TARGET_BYTES:
        return (_largest_divisor(num_layers, num_heads * per_head), num_heads, num_rows, num_keys)
    return (1, _largest_divisor(num_heads, per_head), num_rows, num_keys)


def encode_chunk(chunk: np.ndarray, storage: Storage) -> bytes:
    """A chunk's bytes as HDF5's filter pipeline would write them (shuffle, then deflate).

    Done outside h5py so that the compression runs with the GIL released (zlib does), in the
    writer thread, beside the forward pass; the bytes go in with write_direct_chunk.
    """
    chunk = np.ascontiguousarray(chunk)
    if storage.compression == "none":
        return chunk.tobytes()
    assert storage.compression == "gzip", "lzf chunks are compressed by h5py itself"
    if chunk.itemsize > 1:  # HDF5's shuffle filter: byte k of every element, then byte k + 1, ...
        raw = chunk.view(np.uint8).reshape(-1, chunk.itemsize).T.tobytes()
    else:
        raw = chunk.tobytes()
    return zlib.compress(raw, storage.level)


class H5Writer:
    """Stream texts into an HDF5 file; the file appears at `path` only when `finish` succeeds.

    Use as a context manager: leaving the block with an exception removes the temporary file.
    Either `write` whole texts, or `begin` a text and `write_chunk` its layers as they come
    (the streaming path of extract.py); both give the same bytes. Not thread-safe: one thread
    makes all calls (extract.py gives them to one writer thread).
    """

    def __init__(self, path: Path, num_texts: int, dtype: StorageDtype, storage: Storage | None = None):
        self.path = path
        self.storage = Storage(dtype=dtype) if storage is None else storage
        if self.storage.dtype != dtype:
            raise ValueError(f"dtype {dtype} differs from storage.dtype {self.storage.dtype}")
        self.dtype = np.dtype(dtype)
        self._atomic = AtomicFile(path)
        # libver "v110": compact object headers and chunk indexes (a few kB less per text than
        # HDF5 1.8's B-trees); readable by HDF5 >= 1.10 (2016), h5py >= 2.7.
        self._file = h5py.File(self._atomic.tmp, "w", track_order=True, libver=("v110", "latest"))
        self._ids = [None] * num_texts
        self._texts = self._file.create_group("texts")
        self._attention: dict[int, h5py.Dataset] = {}
        self._finished = False

    def begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        """Store text `index`'s tokens and an empty attention dataset for its chunks.

        `item.attention` is not read (it may be None); `item.query_positions` must match the
        writer's `rows` when they are not all rows.
        """
        group = self._texts.create_group(f"{index:08d}")
        group.attrs["id"] = item.id
        group.attrs["truncated"] = bool(item.truncated)
        group.attrs["num_tokens_untruncated"] = int(item.num_tokens_untruncated)
        group.create_dataset("text", data=item.text, dtype=h5py.string_dtype())
        n = item.num_tokens
        if not self.storage.metrics_only:
            rows = query_positions(self.storage.rows, n)
            if item.query_positions is not None and not np.array_equal(item.query_positions, rows):
                raise ValueError(f"query positions {item.query_positions} do not match rows={self.storage.rows}")
            r = len(rows)
            shape = (num_layers, num_heads, r, n)
            options = {}
            if r and n:
                options = dict(chunks=chunk_shape(num_layers, num_heads, r, n, self.dtype.itemsize))
                if self.storage.compression == "gzip":
                    options.update(compression="gzip", compression_opts=self.storage.level,
                                   shuffle=self.dtype.itemsize > 1)
                elif self.storage.compression == "lzf":
                    options.update(compression="lzf", shuffle=self.dtype.itemsize > 1)
            dataset = group.create_dataset("attention", shape=shape, dtype=self.dtype, **options)
            dataset.attrs["dims"] = ",".join(DIMS)
            if self.dtype == np.uint8:
                dataset.attrs["scale"] = 1.0 / UINT8_SCALE
            if self.storage.rows != "all":
                group.create_dataset("query_positions", data=rows)
            self._attention[index] = dataset
        group.create_dataset("token_ids", data=np.asarray(item.token_ids).astype(np.int64))
        group.create_dataset("tokens", data=list(item.tokens), dtype=h5py.string_dtype())
        group.create_dataset("special_tokens_mask", data=np.asarray(item.special_tokens_mask).astype(bool))
        group.create_dataset("offsets", data=np.asarray(item.offsets).astype(np.int64).reshape(-1, 2))
        group.create_dataset("word_ids", data=np.asarray(item.word_ids).astype(np.int64))
        self._ids[index] = item.id

    def write_chunk(self, index: int, layer: int, head: int, values: np.ndarray) -> None:
        """Write one whole chunk (l, h, r, n) of text `index`, in the storage dtype, at (layer, head)."""
        dataset = self._attention[index]
        if values.dtype != self.dtype or values.shape != dataset.chunks:
            raise ValueError(f"chunk {values.dtype} {values.shape} is not a {self.dtype} {dataset.chunks} chunk")
        if self.storage.compression == "lzf":
            dataset[layer:layer + values.shape[0], head:head + values.shape[1]] = values
        else:
            dataset.id.write_direct_chunk((layer, head, 0, 0), encode_chunk(values, self.storage))

    def end(self, index: int) -> None:
        """Text `index` is complete: drop the writer's handle on its dataset."""
        self._attention.pop(index, None)

    def write(self, index: int, item: TextAttention) -> None:
        """Store one text at position `index` of the user's order (any writing order works).

        `item.attention` holds float32 probabilities (L, H, r, n); they are converted here.
        """
        num_layers, num_heads = item.attention.shape[:2]
        self.begin(index, item, num_layers, num_heads)
        chunks = self._attention[index].chunks if index in self._attention else None
        if chunks:
            stored = to_storage(item.attention, self.storage.dtype)
            for layer in range(0, num_layers, chunks[0]):
                for head in range(0, num_heads, chunks[1]):
                    self.write_chunk(index, layer, head, stored[layer:layer + chunks[0], head:head + chunks[1]])
        self.end(index)

    def write_metrics(self, values: np.ndarray, names: tuple[str, ...], causal: np.ndarray) -> None:
        """Store the (N, L, H, M) per-head metrics of a --metrics-only run."""
        group = self._file.create_group("metrics")
        dataset = group.create_dataset("values", data=np.asarray(values, dtype=np.float64))
        dataset.attrs["dims"] = "text,layer,head,metric"
        group.create_dataset("names", data=list(names), dtype=h5py.string_dtype())
        group.create_dataset("causal", data=np.asarray(causal, dtype=bool))

    def finish(self, provenance: Provenance) -> None:
        missing = [i for i, text_id in enumerate(self._ids) if text_id is None]
        if missing:
            raise RuntimeError(f"texts {missing[:5]} were never written")
        if self.storage.metrics_only and "metrics" not in self._file:
            raise RuntimeError("a metrics-only file needs write_metrics before finish")
        self._file.create_dataset("ids", data=self._ids, dtype=h5py.string_dtype())
        self._file.attrs["format"] = FORMAT_NAME
        self._file.attrs["dims"] = ",".join(DIMS)
        for key, value in _provenance_attrs(provenance).items():
            self._file.attrs[key] = value
        self._file.attrs["compression"] = self.storage.compression
        self._file.attrs["compression_level"] = self.storage.level if self.storage.compression == "gzip" else -1
        self._file.attrs["rows"] = self.storage.rows
        self._file.attrs["metrics_only"] = bool(self.storage.metrics_only)
        self._file.close()
        self._atomic.commit()
        self._finished = True

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:  # an error, or no finish(): leave nothing behind
            if self._file.id.valid:
                self._file.close()
            self._atomic.discard()


def _json_payload(item: TextAttention, provenance: Provenance) -> dict:
    meta = asdict(provenance)
    meta["weight_files"] = list(provenance.weight_files)
    meta["layers"] = list(provenance.layers)
    meta["heads"] = list(provenance.heads)
    meta = {"format": FORMAT_NAME, "dims": list(DIMS), **meta}
    attention = item.attention.astype(np.dtype(provenance.dtype))
    return {
        "tokens": list(item.tokens),
        "text": item.text,
        "attention_matrices": attention.tolist(),
        "id": item.id,
        "token_ids": item.token_ids.tolist(),
        "special_tokens_mask": item.special_tokens_mask.astype(bool).tolist(),
        "offsets": item.offsets.tolist(),
        "word_ids": item.word_ids.tolist(),
        "truncated": bool(item.truncated),
        "num_tokens_untruncated": int(item.num_tokens_untruncated),
        "layers": list(provenance.layers),
        "heads": list(provenance.heads),
        "metadata": meta,
    }


def write_json(path: Path, item: TextAttention, provenance: Provenance) -> None:
    """Write one text in seed 001's JSON format (plus provenance), atomically."""
    if provenance.dtype not in ("float32", "float16"):
        raise AttnpipeError(f"--dtype {provenance.dtype} is for .h5 output; a .json file holds float32 or float16")
    payload = _json_payload(item, provenance)
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, allow_nan=False)
        handle.write("\n")


# ----------------------------------------------------------------------------- reading


class AttentionFile:
    """Read-only view of an attention file (HDF5 or JSON): `meta`, `ids`, and texts by index or id.

    HDF5 texts are read on demand, so one text of a large corpus file costs only its own bytes.
    """

    def __init__(self, path: Path | str, *, partial_rows: bool = False):
        self.path = Path(path)
        # A file of --rows cls|last holds (L, H, r, n) attention: returned only to a caller that
        # says it handles it; analyses that need whole matrices get a clear error instead.
        self.partial_rows = partial_rows
        self.storage = Storage()
        if not self.path.is_file():
            raise AttnpipeError(f"attention file not found: {self.path}")
        self._h5: h5py.File | None = None
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
        _check_version(self.path, int(attrs.get("schema_version", -1)))
        self.meta = _provenance_from_attrs(attrs)
        self.ids = tuple(self._h5["ids"].asstr()[()])
        self.storage = _storage_from_attrs(attrs)  # version 1: the defaults (gzip, all rows)

    def _open_json(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AttnpipeError(f"{self.path} is not valid JSON: {err}") from err
        missing = [k for k in ("tokens", "text", "attention_matrices") if k not in data]
        if missing:
            raise AttnpipeError(f"{self.path} lacks the key(s) {', '.join(missing)}")
        meta = data.get("metadata")
        if meta is not None:
            _check_version(self.path, int(meta.get("schema_version", -1)))
            fields = {k: v for k, v in meta.items() if k not in ("format", "dims")}
            for key in ("weight_files", "layers", "heads"):
                fields[key] = tuple(fields[key])
            self.meta = Provenance(**fields)
        else:  # a file written by seed 001's original tool: nothing but the three keys
            layers, heads = np.shape(data["attention_matrices"])[:2]
            self.meta = Provenance(
                model="unknown", model_type="unknown", weights_sha256="", weight_files=(),
                num_layers=layers, num_heads=heads, layers=tuple(range(layers)),
                heads=tuple(range(heads)), dtype="float32", compute_dtype="unknown",
                method="unknown", max_length=len(data["tokens"]), trust_remote_code=False,
            )
        self._json = data
        self.ids = (str(data.get("id", "text-0")),)

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
            return _text_from_json(self._json)
        self._check_matrices()
        group = self._h5["texts"][f"{index:08d}"]
        positions = group["query_positions"][()] if "query_positions" in group else None
        return TextAttention(
            id=group.attrs["id"],
            text=group["text"].asstr()[()],
            tokens=tuple(group["tokens"].asstr()[()]),
            token_ids=group["token_ids"][()],
            special_tokens_mask=group["special_tokens_mask"][()],
            offsets=group["offsets"][()],
            word_ids=group["word_ids"][()],
            truncated=bool(group.attrs["truncated"]),
            num_tokens_untruncated=int(group.attrs["num_tokens_untruncated"]),
            attention=decode(group["attention"][()]),
            query_positions=positions,
        )

    def head(self, key: int | str, layer: int, head: int) -> np.ndarray:
        """One (query, key) matrix, by *stored* layer and head position, reading only its chunk.

        (n, n) float32; (r, n) for a --rows file opened with partial_rows=True.
        """
        if self._json is not None:
            return self[key].attention[layer, head]
        index = self._position(key)
        self._check_matrices()
        return decode(self._h5[f"texts/{index:08d}/attention"][layer, head])

    def stored_metrics(self, metrics: tuple[str, ...] | None = None):
        """The per-head metrics of a --metrics-only file as corpus_metrics' long table.

        Columns text_id, layer, head (model indices), metric (categorical), value. The per-text
        causal flag the metrics were computed with is `stored_causal()`.
        """
        import pandas as pd

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
        num_texts, num_layers, num_heads, num_metrics = values.shape
        text_idx, layer_idx, head_idx, metric_idx = np.meshgrid(
            np.arange(num_texts), np.arange(num_layers), np.arange(num_heads), np.arange(num_metrics),
            indexing="ij")
        table = pd.DataFrame({
            "text_id": np.asarray(self.ids, dtype=object)[text_idx.ravel()],
            "layer": np.asarray(self.meta.layers, dtype=np.int64)[layer_idx.ravel()],
            "head": np.asarray(self.meta.heads, dtype=np.int64)[head_idx.ravel()],
            "metric": pd.Categorical(np.asarray(wanted)[metric_idx.ravel()], categories=wanted),
            "value": values.ravel(),
        })
        return table

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


def _check_version(path: Path, version: int) -> None:
    if version not in READABLE_VERSIONS:
        raise AttnpipeError(
            f"{path} has attention schema version {version}; this attnpipe reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )


def _storage_from_attrs(attrs) -> Storage:
    def get(key, default):
        value = attrs.get(key, default)
        return value.decode() if isinstance(value, bytes) else value

    compression = str(get("compression", "gzip"))
    level = int(get("compression_level", DEFAULT_GZIP_LEVEL))
    return Storage(
        dtype=str(get("dtype", "float32")),
        compression=compression,
        compression_level=level if compression == "gzip" else None,
        rows=str(get("rows", "all")),
        metrics_only=bool(get("metrics_only", False)),
    )


def _text_from_json(data: dict) -> TextAttention:
    tokens = tuple(data["tokens"])
    n = len(tokens)
    attention = np.asarray(data["attention_matrices"], dtype=np.float32)
    if attention.ndim != 4 or attention.shape[2:] != (n, n):
        raise AttnpipeError(
            f"attention_matrices has shape {attention.shape}; expected (layer, head, {n}, {n})"
        )
    return TextAttention(
        id=str(data.get("id", "text-0")),
        text=data["text"],
        tokens=tokens,
        token_ids=np.asarray(data.get("token_ids", [-1] * n), dtype=np.int64),
        special_tokens_mask=np.asarray(data.get("special_tokens_mask", [False] * n), dtype=bool),
        offsets=np.asarray(data.get("offsets", [[-1, -1]] * n), dtype=np.int64).reshape(n, 2),
        word_ids=np.asarray(data.get("word_ids", [-1] * n), dtype=np.int64),
        truncated=bool(data.get("truncated", False)),
        num_tokens_untruncated=int(data.get("num_tokens_untruncated", n)),
        attention=attention,
    )


def open_attention(path: Path | str, *, partial_rows: bool = False) -> AttentionFile:
    """Open an attention file for reading (use in a `with` block).

    partial_rows=True: also return the (L, H, r, n) attention of --rows cls|last files.
    """
    return AttentionFile(path, partial_rows=partial_rows)
