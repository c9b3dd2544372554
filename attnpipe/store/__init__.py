"""The attention file formats: one writer and one reader for each, and their spec.

Dimension order is always (layer, head, query, key): rows are queries, columns are keys.
Only real tokens are stored: no padding, so a text of n tokens has (L, H, n, n) attention,
where L and H count the *stored* layers and heads (their model indices are in `layers`/`heads`).

HDF5 (`.h5`, many texts), schema version 2 (version 1 files, which lack the storage attributes
below, read as float32/float16, gzip, all rows)::

    /                      attrs: format = "attnpipe-attention", schema_version = 2,
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

Encoder-decoder models (t5, bart, marian; new in version 2) run a source and a target text
together. The fields above then describe the *source*: `text` is the source text, `tokens` its
tokens and `attention` the **encoder** self-attention (L, H, s, s), so code written for
encoders keeps working. The decoder side is added, with L', H' counting the stored *decoder*
layers and heads (model indices in `decoder_layers` / `decoder_heads`)::

    /texts/<i>
        decoder_attention  (L', H', t, t) decoder self-attention (causal: future keys exactly 0)
        cross_attention    (L', H', t, s) decoder -> encoder attention: rows = target, columns = source
        target/            group; attrs truncated (bool), num_tokens_untruncated (int)
            text           scalar utf-8 string: the target text as given
            tokens         (t,) utf-8 strings: the decoder *input* tokens, i.e. the rows (queries) of
                           decoder_attention and cross_attention: the model's decoder start token
                           followed by the tokenized target shifted right by one (teacher forcing,
                           as transformers builds decoder_input_ids from labels)
            token_ids      (t,) int64 ids of those tokens
            special_tokens_mask (t,) bool
            labels         (t,) utf-8 strings: the tokenized target (with its special tokens, e.g.
                           a final </s>); row i of the decoder predicts labels[i]
            label_ids      (t,) int64 ids of the labels

Every text group also has, from version 2 (absent from version 1 files, read back as defaults)::

    /texts/<i>
        attrs input_kind   "text" (default), "image" (ViT: tokens "[CLS]", "patch_<row>_<col>") or
                           "embeddings" (a plain torch model fed an array: tokens "0".."n-1")
        attrs image_path, image_size, patch_grid, patch_size   only for input_kind "image":
                           the image file as given, its (width, height) in pixels before the
                           processor resized it, the (rows, cols) of patches and the patch side in
                           model-input pixels. Token 1 + r·cols + c is the patch at row r, column c;
                           the grid covers the whole image as the processor resized it.

Files extracted with --explain (attnpipe/extract/gradients.py; version 2) also have::

    /texts/<i>
        attrs              gradient_target_value (float64: the explained scalar at gates = 1),
                           gradient_target_label (int64: the class index or next-token id explained; -1
                           for a similarity target)
        attention_grad     (L, H, n, n) float32: d target / d attention probability, same stored
                           layers and heads as `attention` (always float32: gradients span many
                           orders of magnitude); attribute dims = "layer,head,query,key"
        head_gate_grad     (num_layers, num_heads) float32: d target / d gate of every model head
                           at gates = 1 (Michel et al. 2019); head_importance is its absolute value
        head_importance    (num_layers, num_heads) float32: |head_gate_grad|
        token_grad_input   (n,) float32: gradient x input on the word embeddings, summed over
                           the embedding dimension (signed)
        head_ablation      (num_layers, num_heads) float32, only with --ablate: target with that
                           one head's gate at 0 minus gradient_target_value
    /head_importance_mean  (num_layers, num_heads) float32: mean of head_importance over texts
    /head_ablation_mean    (num_layers, num_heads) float32, only with --ablate

Provenance attributes (root of the HDF5 file, `metadata` object of the JSON file):
model (folder as given), model_type, weights_sha256 (sha256 over each weight file's name then
bytes, files sorted by name), weight_files (JSON-encoded list in HDF5), num_layers / num_heads (of the model), layers / heads (stored model indices),
dtype (storage dtype), compute_dtype, method ("manual": our forward pass), max_length,
parity_max_abs_diff and parity_hidden_max_abs_diff (largest difference from transformers'
eager attention measured by --verify; NaN in HDF5 / null in JSON when not verified),
trust_remote_code, library_versions (python, torch, transformers, numpy, h5py, attnpipe: a
JSON-encoded string in HDF5, an object in JSON), gradient_target (version 2: the --explain target,
e.g. "predicted", "2", "next-token", "similarity:<text>"; "" in HDF5 / null in JSON without one).
`layers`/`heads` are sorted, without repeats.
Encoder-decoder files only (version 2): decoder_num_layers / decoder_num_heads (of the model's
decoder) and decoder_layers / decoder_heads (stored decoder indices, for decoder_attention and
cross_attention); for them num_layers/num_heads/layers/heads describe the encoder. Absent
(HDF5) or missing (JSON) in files of encoder-only and decoder-only models.
Version 2 adds: method may also be "hf" (attention read from transformers' eager
`output_attentions`, not our pass); checkpoint_dtype (the dtype the weights were stored in,
e.g. "bfloat16", when known; "" in HDF5 / null in JSON otherwise: computation is float32 anyway).

Storage attributes (schema version 2, root of the HDF5 file; read by `AttentionFile.storage`):
compression ("gzip", "lzf" or "none"), compression_level (gzip level 0-12; -1 otherwise),
rows ("all", "cls" or "last": which query rows `attention` holds), metrics_only (bool).
dtype "uint8" stores v = round(p * 255) (UINT8_SCALE): the reader returns p = v / 255 as float32,
at most 0.5/255 ≈ 0.00196 from the computed probability; the attention dataset carries the
attribute scale = 1/255 for plain-h5py readers.

Metrics only (`metrics_only` true, written by `extract_attention.py --metrics-only`): the texts
keep every dataset except `attention`, and the per-head metrics of attnpipe.analyze.metrics are stored
instead, as one array that the reader turns into the long table of `corpus_metrics`::

    /metrics/values        (N, L, H, M) float64: text (user's order) x stored layer x stored
                           head x metric; attribute dims = "text,layer,head,metric"
    /metrics/names         (M,) utf-8 strings: the metric names, in order
    /metrics/causal        (N,) bool: whether each text's queries saw only earlier keys

JSON (`.json`, one text), seed 001's format with extra keys::

    {"tokens": [...], "text": "...", "attention_matrices": [layer][head][query][key],
     "id": "...", "token_ids": [...], "special_tokens_mask": [...], "offsets": [[s, e], ...],
     "word_ids": [...], "truncated": false, "num_tokens_untruncated": n,
     "layers": [...], "heads": [...], "metadata": {"format": ..., "schema_version": 2, ...},
     "input_kind": "text", "image": null | {"path": ..., "size": [w, h], "patch_grid": [rows, cols],
     "patch_size": p}}

Encoder-decoder files add (version 2) "decoder_attention_matrices" [layer][head][target][target],
"cross_attention_matrices" [layer][head][target][source], "decoder_layers", "decoder_heads" and
"target": {"text", "tokens", "token_ids", "special_tokens_mask", "labels", "label_ids",
"truncated", "num_tokens_untruncated"}, with the same meanings as in HDF5.

With --explain (version 2) the JSON also has `attention_grad` [layer][head][query][key],
`head_gate_grad`, `head_importance` (and `head_ablation` with --ablate) as [layer][head],
`token_grad_input` [token], `gradient_target_value` and `gradient_target_label`, as in HDF5.

`tokens` and `attention_matrices` hold real tokens only (seed 001 kept [PAD] entries in
`tokens`; a single text needs no padding, so there is none to flag).

JSON holds float32 or float16 values of all rows; uint8, row subsets and metrics-only are
HDF5-only.

Writes are atomic: a temporary file in the output folder, renamed over the target when complete.
The HDF5 writer refuses NUL (U+0000) in ids, texts and tokens (HDF5 strings cannot hold it; JSON
can) and checks the disk / file-size limit has room before each text. The reader validates every
text it returns (`check_text`): structure, shapes, finite non-negative values, and rows summing to
1 within ROW_SUM_TOL[dtype]; anything else is one AttnpipeError naming file, text, layer and head.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import resource
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import deflate
import h5py
import numpy as np
from isal import isal_zlib

from attnpipe import faults
from attnpipe.store.atomic import AtomicFile, atomic_path, check_writable, write_errors
from attnpipe.errors import AttnpipeError

SCHEMA_VERSION = 2  # 2: encoder-decoder, image, embedding and gradient fields; storage options
READABLE_VERSIONS = (1, 2)  # version 1 lacks only the fields added in 2
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
# gzip chunks are standard zlib streams, which every HDF5 reads with its deflate filter; we make
# them with faster coders than zlib (encode_chunk): levels 0-3 with ISA-L (python-isal), 4-12 with
# libdeflate (package `deflate`). On the 256 demo texts of MiniLM (bench/bench_extract.py, one core):
#   float16 (shuffled)   zlib 1: 0.76 s, 1.666 B/value   ISA-L 1: 0.08 s, 1.688   libdeflate 6: 0.47 s, 1.626
#   uint8                zlib 4: 0.41 s, 0.409           ISA-L 1: 0.06 s, 0.410   libdeflate 6: 0.35 s, 0.389
#                        zlib 9: 7.4 s, 0.385            libdeflate 12: 6.2 s, 0.349
# A float's low mantissa byte is incompressible noise, so floats take the fast level 1; 8-bit
# values, chosen to save disk, take level 6.
MAX_GZIP_LEVEL = 12
DEFAULT_GZIP_LEVELS = {"float32": 1, "float16": 1, "uint8": 6}
CHUNK_TARGET_BYTES = 1 << 20  # chunks of at most ~1 MiB: one matrix read costs one small chunk
# Reading checks that every stored row sums to 1 within this tolerance, by storage dtype.
# float32: float32 softmax rounding (~1e-7 measured) with room for long rows. float16: each value
# is rounded to 11 significant bits (relative error <= 2**-11 ~ 4.9e-4, summed over a row of
# weights adding to 1) and values under 6e-8 flush to 0 (<= n·6e-8): 2e-3 covers rows of 10k keys.
ROW_SUM_TOL = {"float32": 1e-4, "float16": 2e-3, "uint8": 1e-4}
# uint8 rounds each value by at most 0.5/255, so a row of n keys may sum to 1 ± n·0.5/255:
# check_rows adds that bound for uint8 files (it is exact, not a loosened guess).
UINT8_ROW_SLACK = 0.5 / 255
# What every text group holds (datasets, then attributes): the reader checks they are there.
TEXT_DATASETS = ("text", "attention", "token_ids", "tokens", "special_tokens_mask", "offsets", "word_ids")
TEXT_ATTRS = ("id", "truncated", "num_tokens_untruncated")
# What AttentionFile.metric_inputs reads (and checks) for the metrics' fast path.
METRIC_DATASETS = ("attention", "tokens", "special_tokens_mask")
# Room kept free for HDF5's own structures (B-trees, heaps, attributes) beyond a text's data.
WRITE_MARGIN_BYTES = 1 << 16


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
    # Encoder-decoder models only (None otherwise); the fields above then describe the encoder.
    decoder_num_layers: int | None = None
    decoder_num_heads: int | None = None
    decoder_layers: tuple[int, ...] | None = None
    decoder_heads: tuple[int, ...] | None = None
    checkpoint_dtype: str | None = None  # version 2: the weights' stored dtype, when known
    gradient_target: str | None = None  # version 2: what gradients explain (--explain), None without

    @property
    def is_seq2seq(self) -> bool:
        return self.decoder_layers is not None


DECODER_FIELDS = ("decoder_num_layers", "decoder_num_heads", "decoder_layers", "decoder_heads")


@dataclass(frozen=True)
class TargetAttention:
    """The decoder side of one source/target pair of an encoder-decoder model."""

    text: str
    tokens: tuple[str, ...]  # decoder input tokens: start token + target shifted right = the rows
    token_ids: np.ndarray  # (t,) int64
    special_tokens_mask: np.ndarray  # (t,) bool
    labels: tuple[str, ...]  # the tokenized target: row i predicts labels[i]
    label_ids: np.ndarray  # (t,) int64
    truncated: bool
    num_tokens_untruncated: int
    decoder_attention: np.ndarray  # (L', H', t, t) float32, causal
    cross_attention: np.ndarray  # (L', H', t, s) float32: rows = target, columns = source

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


InputKind = Literal["text", "image", "embeddings"]


@dataclass(frozen=True)
class ImageInfo:
    """Where an image's patch tokens lie (version 2). Token 1 + r·cols + c is patch (r, c)."""

    path: str  # the image file as given
    size: tuple[int, int]  # (width, height) in pixels, before the processor resized it
    patch_grid: tuple[int, int]  # (rows, cols) of patches
    patch_size: int  # patch side in model-input pixels


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
    target: TargetAttention | None = None  # encoder-decoder models: then `attention` is the encoder's
    input_kind: InputKind = "text"  # version 2
    image: ImageInfo | None = None  # version 2, input_kind "image" only
    # Version 2, only with --target (attnpipe/extract/gradients.py); None otherwise.
    attention_grad: np.ndarray | None = None  # (L, H, n, n) d target / d attention
    head_gate_grad: np.ndarray | None = None  # (num_layers, num_heads) d target / d head gate
    token_grad_input: np.ndarray | None = None  # (n,) gradient x input on word embeddings
    head_ablation: np.ndarray | None = None  # (num_layers, num_heads) target change, head zeroed
    gradient_target_value: float | None = None
    gradient_target_label: int | None = None

    @property
    def head_importance(self) -> np.ndarray | None:
        """|d target / d gate| per (model layer, model head) (Michel et al. 2019)."""
        return None if self.head_gate_grad is None else np.abs(self.head_gate_grad)
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
    attrs["gradient_target"] = "" if prov.gradient_target is None else prov.gradient_target
    attrs["layers"] = np.asarray(prov.layers, dtype=np.int64)
    attrs["heads"] = np.asarray(prov.heads, dtype=np.int64)
    for key in DECODER_FIELDS:  # written only for encoder-decoder models
        if attrs[key] is None:
            del attrs[key]
        elif key in ("decoder_layers", "decoder_heads"):
            attrs[key] = np.asarray(attrs[key], dtype=np.int64)
    attrs["checkpoint_dtype"] = prov.checkpoint_dtype or ""  # attributes cannot hold None
    return attrs


class _MissingAttribute(KeyError):
    """A provenance attribute the file should have and does not (its name is the argument)."""


def _provenance_from_attrs(attrs) -> Provenance:
    def get(key):
        if key not in attrs:
            raise _MissingAttribute(key)
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
        decoder_num_layers=int(get("decoder_num_layers")) if "decoder_num_layers" in attrs else None,
        decoder_num_heads=int(get("decoder_num_heads")) if "decoder_num_heads" in attrs else None,
        decoder_layers=tuple(int(x) for x in get("decoder_layers")) if "decoder_layers" in attrs else None,
        decoder_heads=tuple(int(x) for x in get("decoder_heads")) if "decoder_heads" in attrs else None,
        checkpoint_dtype=(get("checkpoint_dtype") or None) if "checkpoint_dtype" in attrs else None,
        gradient_target=(get("gradient_target") or None) if "gradient_target" in attrs else None,
    )


@dataclass(frozen=True)
class Storage:
    """How attention is stored in an HDF5 file (root attributes of schema version 2)."""

    dtype: StorageDtype = "float32"
    compression: Compression = "gzip"
    compression_level: int | None = None  # gzip only: 0-12, None = DEFAULT_GZIP_LEVELS[dtype]
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
            if not 0 <= self.compression_level <= MAX_GZIP_LEVEL:
                raise AttnpipeError(f"--compression-level {self.compression_level} is out of range: "
                                    f"use 0-{MAX_GZIP_LEVEL}")

    @property
    def level(self) -> int:
        return DEFAULT_GZIP_LEVELS[self.dtype] if self.compression_level is None else self.compression_level

    def h5_filters(self, itemsize: int) -> dict:
        """h5py create_dataset options for this compression (shuffle helps multi-byte values only)."""
        if self.compression == "gzip":
            # HDF5 records a zlib level of at most 9; the chunks themselves come from encode_chunk.
            return dict(compression="gzip", compression_opts=min(self.level, 9), shuffle=itemsize > 1)
        if self.compression == "lzf":
            return dict(compression="lzf", shuffle=itemsize > 1)
        return {}


def _extra_arrays(item: TextAttention) -> list[np.ndarray]:
    """The arrays a text carries besides its attention (decoder side, gradients): for room checks."""
    arrays = [a for a in (item.attention_grad, item.head_gate_grad, item.token_grad_input, item.head_ablation)
              if a is not None]
    if item.target is not None:
        arrays += [item.target.decoder_attention, item.target.cross_attention]
    return arrays


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

    Done outside h5py so that the compression runs with the GIL released (both coders do), in
    the writer thread, beside the forward pass; the bytes go in with write_direct_chunk. The
    coder depends on the level (see DEFAULT_GZIP_LEVELS); either writes a standard zlib stream.
    """
    chunk = np.ascontiguousarray(chunk)
    if storage.compression == "none":
        return chunk.tobytes()
    assert storage.compression == "gzip", "lzf chunks are compressed by h5py itself"
    if chunk.itemsize > 1:  # HDF5's shuffle filter: byte k of every element, then byte k + 1, ...
        raw = chunk.view(np.uint8).reshape(-1, chunk.itemsize).T.tobytes()
    else:
        raw = chunk.tobytes()
    return deflate_bytes(raw, storage.level)


# Filter pipelines read_whole inflates itself: what H5Writer writes with gzip.
_INFLATED_PIPELINES = ((h5py.h5z.FILTER_DEFLATE,), (h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_DEFLATE))


def read_whole(dataset: h5py.Dataset) -> np.ndarray:
    """dataset[()], with deflate(+shuffle) chunks inflated by libdeflate outside HDF5.

    The inverse of encode_chunk. HDF5's own filters (zlib, then a byte-by-byte unshuffle) took
    twice as long on attention files' small chunks, and analyses read every text whole. Anything
    else (other filters, a chunk stored with a filter skipped, a chunk that will not inflate)
    goes through h5py, which reads or reports it as before.
    """
    chunks, dtype, shape = dataset.chunks, dataset.dtype, dataset.shape  # each a call into HDF5
    little_endian = dtype.byteorder in "<|" or (dtype.byteorder == "=" and sys.byteorder == "little")
    if (chunks is None or 0 in shape or dtype.kind not in "biuf" or not little_endian
            or dtype.itemsize not in (1, 2, 4, 8)):
        return dataset[()]
    plist = dataset.id.get_create_plist()
    pipeline = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
    if pipeline not in _INFLATED_PIPELINES:
        return dataset[()]
    itemsize = dtype.itemsize
    chunk_bytes = math.prod(chunks) * itemsize
    out = None if chunks == shape else np.empty(shape, dtype)
    try:
        for offset in itertools.product(*(range(0, size, step) for size, step in zip(shape, chunks))):
            skipped, raw = dataset.id.read_direct_chunk(offset)
            if skipped:
                return dataset[()]
            data = np.frombuffer(deflate.zlib_decompress(raw, chunk_bytes), np.uint8)
            if len(pipeline) == 2 and itemsize > 1:
                data = _unshuffle(data, itemsize)
            else:
                data = data.copy()  # writable
            chunk = data.view(dtype).reshape(chunks)
            if out is None:
                return chunk
            region = tuple(slice(start, min(start + step, size)) for start, step, size in zip(offset, chunks, shape))
            out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
    except (OSError, ValueError, KeyError, deflate.DeflateError):
        return dataset[()]
    return out


def _unshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """HDF5's shuffle undone: run k of `data` holds byte k (little-endian) of every value.

    Shifts and ors on whole runs: 10x numpy's transposing copy.
    """
    runs = data.reshape(itemsize, -1)
    values = runs[itemsize - 1].astype(f"<u{itemsize}")
    for k in range(itemsize - 2, -1, -1):
        values <<= 8
        values |= runs[k]
    return values


def deflate_bytes(raw: bytes, level: int) -> bytes:
    """A zlib stream of `raw`: ISA-L at levels 0-3, libdeflate at 4-12 (both faster than zlib)."""
    if level <= 3:
        return isal_zlib.compress(raw, level)
    return deflate.zlib_compress(raw, level)


def metrics_table(ids, layers, heads, names, values: np.ndarray):
    """(texts, L, H, M) per-head metric values as corpus_metrics' long table: text_id, layer,
    head (model indices), metric (categorical, in `names` order), value."""
    import pandas as pd

    names = list(names)
    num_texts, num_layers, num_heads, num_metrics = values.shape
    text_idx, layer_idx, head_idx, metric_idx = np.meshgrid(
        np.arange(num_texts), np.arange(num_layers), np.arange(num_heads), np.arange(num_metrics),
        indexing="ij")
    return pd.DataFrame({
        "text_id": np.asarray(list(ids), dtype=object)[text_idx.ravel()],
        "layer": np.asarray(layers, dtype=np.int64)[layer_idx.ravel()],
        "head": np.asarray(heads, dtype=np.int64)[head_idx.ravel()],
        "metric": pd.Categorical.from_codes(metric_idx.ravel(), categories=names),
        "value": values.ravel(),
    })


def write_metrics_group(file: h5py.File, values: np.ndarray, names, causal: np.ndarray) -> None:
    """The /metrics group of a --metrics-only file: (N, L, H, M) values, metric names, (N,) causal.
    Written by H5Writer and by scripts/merge_shards.py (the shards' arrays concatenated)."""
    group = file.create_group("metrics")
    dataset = group.create_dataset("values", data=np.asarray(values, dtype=np.float64))
    dataset.attrs["dims"] = "text,layer,head,metric"
    group.create_dataset("names", data=list(names), dtype=h5py.string_dtype())
    group.create_dataset("causal", data=np.asarray(causal, dtype=bool))


# HDF5's metadata cache (object headers, group indexes) starts at 2 MiB and adapts up to 32 MiB
# while thousands of small objects are made. A file written once, front to back, gains little from
# it, and that memory made a run's peak grow with its corpus (bench: 5,000 texts +25 MB, 500 +13).
METADATA_CACHE_BYTES = 1 << 20


def _cap_metadata_cache(file: h5py.File) -> None:
    config = file.id.get_mdc_config()
    config.set_initial_size = True
    config.initial_size = config.max_size = METADATA_CACHE_BYTES
    config.min_size = min(config.min_size, METADATA_CACHE_BYTES)
    file.id.set_mdc_config(config)


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
        with write_errors(path):
            # No raw-data chunk cache: each chunk is written when its dataset is, so a full disk or
            # a file-size limit raises right there (with a cache it surfaces while h5py frees
            # objects, as printed warnings, and the process may crash). libver "v110": compact
            # object headers and chunk indexes, readable by HDF5 >= 1.10 (2016), h5py >= 2.7.
            self._file = h5py.File(self._atomic.tmp, "w", track_order=True, rdcc_nbytes=0,
                                   libver=("v110", "latest"))
            _cap_metadata_cache(self._file)
        self._ids = [None] * num_texts
        self._texts = self._file.create_group("texts")
        self._attention: dict[int, h5py.Dataset] = {}
        self._finished = False
        self._sums: dict[str, list[np.ndarray]] = {"head_importance_mean": [], "head_ablation_mean": []}

    def begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        """Store text `index`'s tokens (and any target, image or gradient fields) and an empty
        attention dataset for its chunks.

        `item.attention` is not read (it may be None); `item.query_positions` must match the
        writer's `rows` when they are not all rows.
        """
        _check_no_nul(item)
        n = item.num_tokens
        rows = n if self.storage.rows == "all" else 1
        strings = len(item.text.encode()) + sum(len(t.encode()) + 16 for t in item.tokens)
        extra = sum(a.nbytes for a in _extra_arrays(item))
        self._check_room(num_layers * num_heads * rows * n * self.dtype.itemsize + 40 * n + strings + extra)
        with write_errors(self.path):
            self._begin(index, item, num_layers, num_heads)

    def _check_room(self, nbytes: int) -> None:
        """Refuse before HDF5 writes what the disk or the file-size limit cannot take.

        HDF5 copes badly with a write failing inside its caches (errors while objects are freed,
        sometimes a crash), so room for the text's uncompressed bytes plus a margin is checked
        first: a conservative estimate, as gzip only makes the data smaller.
        """
        size = self._atomic.tmp.stat().st_size
        stat = os.statvfs(self._atomic.tmp.parent)
        room, what = stat.f_bavail * stat.f_frsize, "free disk space"
        if stat.f_blocks == 0:  # a file system that reports no sizes (some FUSE/network mounts)
            room = 1 << 62
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY and limit - size < room:
            room, what = limit - size, "the file-size limit (ulimit -f)"
        if nbytes + WRITE_MARGIN_BYTES > room:
            raise AttnpipeError(
                f"could not write {self.path}: {what} leaves {max(room, 0)} bytes, the next text needs "
                f"up to {nbytes + WRITE_MARGIN_BYTES} (disk full or file-size limit?)"
            )

    def _begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        n = item.num_tokens
        group = self._texts.create_group(f"{index:08d}")
        group.attrs["id"] = item.id
        group.attrs["truncated"] = bool(item.truncated)
        group.attrs["num_tokens_untruncated"] = int(item.num_tokens_untruncated)
        group.create_dataset("text", data=item.text, dtype=h5py.string_dtype())
        if not self.storage.metrics_only:
            rows = query_positions(self.storage.rows, n)
            if item.query_positions is not None and not np.array_equal(item.query_positions, rows):
                raise ValueError(f"query positions {item.query_positions} do not match rows={self.storage.rows}")
            r = len(rows)
            shape = (num_layers, num_heads, r, n)
            options = {}
            if r and n:
                options = dict(chunks=chunk_shape(num_layers, num_heads, r, n, self.dtype.itemsize),
                               **self.storage.h5_filters(self.dtype.itemsize))
            dataset = group.create_dataset("attention", shape=shape, dtype=self.dtype, **options)
            dataset.attrs["dims"] = ",".join(DIMS)
            if self.dtype == np.uint8:
                dataset.attrs["scale"] = 1.0 / UINT8_SCALE
            if self.storage.rows != "all":
                group.create_dataset("query_positions", data=rows)
            self._attention[index] = dataset
            faults.point("write")
        group.create_dataset("token_ids", data=np.asarray(item.token_ids).astype(np.int64))
        group.create_dataset("tokens", data=list(item.tokens), dtype=h5py.string_dtype())
        group.create_dataset("special_tokens_mask", data=np.asarray(item.special_tokens_mask).astype(bool))
        group.create_dataset("offsets", data=np.asarray(item.offsets).astype(np.int64).reshape(-1, 2))
        group.create_dataset("word_ids", data=np.asarray(item.word_ids).astype(np.int64))
        if item.target is not None:
            self._write_target(group, item.target)
        group.attrs["input_kind"] = item.input_kind
        if item.image is not None:
            group.attrs["image_path"] = item.image.path
            group.attrs["image_size"] = np.asarray(item.image.size, dtype=np.int64)
            group.attrs["patch_grid"] = np.asarray(item.image.patch_grid, dtype=np.int64)
            group.attrs["patch_size"] = int(item.image.patch_size)
        if item.attention_grad is not None:
            self._write_gradients(group, item)
        self._ids[index] = item.id

    def write_chunk(self, index: int, layer: int, head: int, values: np.ndarray) -> None:
        """Write one whole chunk (l, h, r, n) of text `index`, in the storage dtype, at (layer, head)."""
        dataset = self._attention[index]
        if values.dtype != self.dtype or values.shape != dataset.chunks:
            raise ValueError(f"chunk {values.dtype} {values.shape} is not a {self.dtype} {dataset.chunks} chunk")
        with write_errors(self.path):
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
        write_metrics_group(self._file, values, names, causal)

    def _attention_dataset(self, group, name: str, attention: np.ndarray) -> None:
        """(layer, head, query, key) probabilities in the file's storage dtype and compression."""
        layers, heads, rows, cols = attention.shape
        options = {}
        if rows and cols:
            options = dict(chunks=chunk_shape(layers, heads, rows, cols, self.dtype.itemsize),
                           **self.storage.h5_filters(self.dtype.itemsize))
        dataset = group.create_dataset(name, data=to_storage(attention, self.storage.dtype), **options)
        dataset.attrs["dims"] = ",".join(DIMS)
        if self.dtype == np.uint8:
            dataset.attrs["scale"] = 1.0 / UINT8_SCALE

    def _write_target(self, group, target: TargetAttention) -> None:
        """The decoder side of an encoder-decoder text (schema version 2)."""
        self._attention_dataset(group, "decoder_attention", target.decoder_attention)
        self._attention_dataset(group, "cross_attention", target.cross_attention)
        sub = group.create_group("target")
        sub.attrs["truncated"] = bool(target.truncated)
        sub.attrs["num_tokens_untruncated"] = int(target.num_tokens_untruncated)
        sub.create_dataset("text", data=target.text, dtype=h5py.string_dtype())
        sub.create_dataset("tokens", data=list(target.tokens), dtype=h5py.string_dtype())
        sub.create_dataset("token_ids", data=target.token_ids.astype(np.int64))
        sub.create_dataset("special_tokens_mask", data=target.special_tokens_mask.astype(bool))
        sub.create_dataset("labels", data=list(target.labels), dtype=h5py.string_dtype())
        sub.create_dataset("label_ids", data=target.label_ids.astype(np.int64))

    def _write_gradients(self, group, item: TextAttention) -> None:
        """Version 2's optional gradient datasets (see the module docstring)."""
        group.attrs["gradient_target_value"] = float(item.gradient_target_value)
        group.attrs["gradient_target_label"] = int(item.gradient_target_label)
        layers, heads, n, _ = item.attention_grad.shape
        grad = group.create_dataset(
            "attention_grad", data=item.attention_grad.astype(np.float32),
            chunks=(1, heads, n, n) if n else None, compression="gzip" if n else None, shuffle=bool(n),
        )
        grad.attrs["dims"] = ",".join(DIMS)
        group.create_dataset("head_gate_grad", data=item.head_gate_grad.astype(np.float32))
        group.create_dataset("head_importance", data=item.head_importance.astype(np.float32))
        group.create_dataset("token_grad_input", data=item.token_grad_input.astype(np.float32))
        self._sums["head_importance_mean"].append(item.head_importance.astype(np.float64))
        if item.head_ablation is not None:
            group.create_dataset("head_ablation", data=item.head_ablation.astype(np.float32))
            self._sums["head_ablation_mean"].append(item.head_ablation.astype(np.float64))

    def finish(self, provenance: Provenance) -> None:
        missing = [i for i, text_id in enumerate(self._ids) if text_id is None]
        if missing:
            raise RuntimeError(f"texts {missing[:5]} were never written")
        self._check_room(sum(len(i.encode()) + 16 for i in self._ids))
        with write_errors(self.path):
            self._file.create_dataset("ids", data=self._ids, dtype=h5py.string_dtype())
            for name, values in self._sums.items():  # corpus means of the per-text head scores
                if values:
                    self._file.create_dataset(name, data=np.mean(values, axis=0).astype(np.float32))
            faults.point("finish")
            if self.storage.metrics_only and "metrics" not in self._file:
                raise RuntimeError("a metrics-only file needs write_metrics before finish")
            self._file.attrs["format"] = FORMAT_NAME
            self._file.attrs["dims"] = ",".join(DIMS)
            for key, value in _provenance_attrs(provenance).items():
                self._file.attrs[key] = value
            self._file.attrs["compression"] = self.storage.compression
            self._file.attrs["compression_level"] = self.storage.level if self.storage.compression == "gzip" else -1
            self._file.attrs["rows"] = self.storage.rows
            self._file.attrs["metrics_only"] = bool(self.storage.metrics_only)
            try:
                self._file.close()  # writes the cached metadata: a full disk can fail here
            except RuntimeError as err:
                raise OSError(str(err)) from err
            self._check_complete()
        faults.point("close")
        self._atomic.commit()
        self._finished = True

    def _check_complete(self) -> None:
        """Re-open the closed temporary file: it must read back with every text before the rename.

        A write that failed inside HDF5's cache (disk full, file-size limit) can surface only at
        close, and h5py does not always raise there; this read makes sure it is caught.
        """
        try:
            with h5py.File(self._atomic.tmp, "r") as check:
                complete = (check.attrs.get("format") == FORMAT_NAME and len(check["ids"]) == len(self._ids)
                            and len(check["texts"]) == len(self._ids))
        except (OSError, KeyError) as err:
            raise AttnpipeError(f"could not write {self.path}: the file did not read back ({err})") from err
        if not complete:
            raise AttnpipeError(f"could not write {self.path}: the file did not read back complete")

    def __enter__(self) -> H5Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._finished:  # an error, or no finish(): leave nothing behind
            if self._file.id.valid:
                with contextlib.suppress(OSError, RuntimeError):  # a full disk may fail the close too
                    self._file.close()
            self._atomic.discard()


def _check_no_nul(item: TextAttention) -> None:
    """HDF5 variable-length strings end at NUL, so a NUL would be cut silently: refuse it."""
    for what, value in (("id", item.id), ("text", item.text), *(("token", t) for t in item.tokens)):
        if "\x00" in value:
            raise AttnpipeError(
                f"text {item.id!r}: its {what} contains a NUL character (U+0000), which HDF5 strings "
                "cannot hold; remove it, or write one text to .json, which keeps it"
            )


def _json_payload(item: TextAttention, provenance: Provenance) -> dict:
    meta = asdict(provenance)
    meta["weight_files"] = list(provenance.weight_files)
    meta["layers"] = list(provenance.layers)
    meta["heads"] = list(provenance.heads)
    for key in DECODER_FIELDS:  # encoder-decoder models only
        if meta[key] is None:
            del meta[key]
        elif key in ("decoder_layers", "decoder_heads"):
            meta[key] = list(meta[key])
    meta = {"format": FORMAT_NAME, "dims": list(DIMS), **meta}
    attention = item.attention.astype(np.dtype(provenance.dtype))
    gradients = {}
    if item.attention_grad is not None:
        gradients = {
            "attention_grad": item.attention_grad.astype(np.float32).tolist(),
            "head_gate_grad": item.head_gate_grad.astype(np.float32).tolist(),
            "head_importance": item.head_importance.astype(np.float32).tolist(),
            "token_grad_input": item.token_grad_input.astype(np.float32).tolist(),
            "gradient_target_value": float(item.gradient_target_value),
            "gradient_target_label": int(item.gradient_target_label),
        }
        if item.head_ablation is not None:
            gradients["head_ablation"] = item.head_ablation.astype(np.float32).tolist()
    payload = {
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
        "input_kind": item.input_kind,
        "image": None if item.image is None else {
            "path": item.image.path, "size": list(item.image.size),
            "patch_grid": list(item.image.patch_grid), "patch_size": item.image.patch_size,
        },
        **gradients,
    }
    if item.target is not None:
        payload.update(_target_payload(item.target, provenance))
    return payload


def _target_payload(target: TargetAttention, provenance: Provenance) -> dict:
    dtype = np.dtype(provenance.dtype)
    return {
        "decoder_attention_matrices": target.decoder_attention.astype(dtype).tolist(),
        "cross_attention_matrices": target.cross_attention.astype(dtype).tolist(),
        "decoder_layers": list(provenance.decoder_layers),
        "decoder_heads": list(provenance.decoder_heads),
        "target": {
            "text": target.text,
            "tokens": list(target.tokens),
            "token_ids": target.token_ids.tolist(),
            "special_tokens_mask": target.special_tokens_mask.astype(bool).tolist(),
            "labels": list(target.labels),
            "label_ids": target.label_ids.tolist(),
            "truncated": bool(target.truncated),
            "num_tokens_untruncated": int(target.num_tokens_untruncated),
        },
    }


def write_json(path: Path, item: TextAttention, provenance: Provenance) -> None:
    """Write one text in seed 001's JSON format (plus provenance), atomically."""
    if provenance.dtype not in ("float32", "float16"):
        raise AttnpipeError(f"--dtype {provenance.dtype} is for .h5 output; a .json file holds float32 or float16")
    payload = _json_payload(item, provenance)
    with write_errors(path), atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as handle:
        json.dump(payload, handle, ensure_ascii=False, allow_nan=False)
        faults.point("json")
        handle.write("\n")


class JSONWriter:
    """H5Writer's interface for a .json output: holds its one text until `finish` writes it."""

    def __init__(self, path: Path):
        self.path = path
        self._item: TextAttention | None = None

    def write(self, index: int, item: TextAttention) -> None:
        if index != 0 or self._item is not None:
            raise RuntimeError("a .json output holds exactly one text")
        self._item = item

    def finish(self, provenance: Provenance) -> None:
        if self._item is None:
            raise RuntimeError("no text was written")
        write_json(self.path, self._item, provenance)

    def __enter__(self) -> JSONWriter:
        return self

    def __exit__(self, *exc) -> None:
        pass  # nothing is on disk before finish()


def open_writer(path: Path, num_texts: int, dtype: StorageDtype) -> H5Writer | JSONWriter:
    """The writer for `path`'s format: HDF5 streams texts, JSON holds its one text (use in `with`)."""
    return JSONWriter(path) if path.suffix == ".json" else H5Writer(path, num_texts, dtype)


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
        try:
            _check_version(self.path, int(attrs.get("schema_version", -1)))
            missing = [name for name in ("ids", "texts") if name not in self._h5]
            if missing:
                raise AttnpipeError(f"{self.path} is a damaged attention file: it lacks {', '.join(missing)}")
            self.meta = _provenance_from_attrs(attrs)
            self.ids = tuple(self._h5["ids"].asstr()[()])
            _check_meta(self.path, self.meta)
            self.storage = _storage_from_attrs(attrs)  # version 1: the defaults (gzip, all rows)
            self._texts = self._h5["texts"]  # kept: each lookup through the file costs 3x one through it
            if len(self._texts) != len(self.ids):
                raise AttnpipeError(f"{self.path} is a damaged attention file: it lists {len(self.ids)} ids "
                                    f"but holds {len(self._texts)} texts")
        except _MissingAttribute as err:
            self.close()
            raise AttnpipeError(f"{self.path} is a damaged attention file: it lacks {err.args[0]}") from err
        except (KeyError, ValueError, TypeError, OSError) as err:
            self.close()
            raise AttnpipeError(f"{self.path} is a damaged attention file: {_reason(err)}") from err
        except AttnpipeError:
            self.close()
            raise

    def _open_json(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise AttnpipeError(f"{self.path} is not valid JSON: {err}") from err
        if not isinstance(data, dict):
            raise AttnpipeError(f"{self.path} is JSON but not an attention file (expected an object)")
        missing = [k for k in ("tokens", "text", "attention_matrices") if k not in data]
        if missing:
            raise AttnpipeError(f"{self.path} lacks the key(s) {', '.join(missing)}")
        if not isinstance(data["tokens"], list) or not all(isinstance(t, str) for t in data["tokens"]):
            raise AttnpipeError(f"{self.path}: 'tokens' must be a list of strings")
        if not isinstance(data["text"], str):
            raise AttnpipeError(f"{self.path}: 'text' must be a string")
        meta = data.get("metadata")
        if meta is not None:
            if not isinstance(meta, dict):
                raise AttnpipeError(f"{self.path}: 'metadata' must be an object")
            try:
                _check_version(self.path, int(meta.get("schema_version", -1)))
                fields = {k: v for k, v in meta.items() if k not in ("format", "dims")}
                for key in ("weight_files", "layers", "heads", "decoder_layers", "decoder_heads"):
                    if fields.get(key) is not None:
                        fields[key] = tuple(fields[key])
                self.meta = Provenance(**fields)
            except (KeyError, TypeError, ValueError) as err:
                raise AttnpipeError(f"{self.path} has damaged metadata: {_reason(err)}") from err
            _check_meta(self.path, self.meta)
        else:  # a file written by seed 001's original tool: nothing but the three keys
            layers, heads = _json_matrices(self.path, data).shape[:2]
            self.meta = Provenance(
                model="unknown", model_type="unknown", weights_sha256="", weight_files=(),
                num_layers=layers, num_heads=heads, layers=tuple(range(layers)),
                heads=tuple(range(heads)), dtype="float32", compute_dtype="unknown",
                method="unknown", max_length=len(data["tokens"]), trust_remote_code=False,
            )
        self._json = data
        self.ids = (str(data.get("id", "text-0")),)
        try:
            self[0]  # one text: check it now, so every command fails at once on a damaged file
        except (ValueError, TypeError) as err:
            raise AttnpipeError(f"{self.path} has a damaged field: {_reason(err)}") from err

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
            item = _text_from_json(self.path, self._json)
        else:
            self._check_matrices()
            try:
                group = self._texts[f"{index:08d}"]
                missing = [name for name in TEXT_DATASETS if name not in group] + [
                    name for name in TEXT_ATTRS if name not in group.attrs]
                if missing:
                    raise AttnpipeError(f"{self.path}: text {index} is damaged: it lacks {', '.join(missing)}")

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
                    num_tokens_untruncated=int(group.attrs["num_tokens_untruncated"]),
                    attention=decode(read_whole(group["attention"])),
                    query_positions=group["query_positions"][()] if "query_positions" in group else None,
                    target=_target_from_h5(group) if "target" in group else None,
                    input_kind=str(group.attrs.get("input_kind", "text")),
                    image=_image_from_attrs(group.attrs),
                    attention_grad=optional("attention_grad"),
                    head_gate_grad=optional("head_gate_grad"),
                    token_grad_input=optional("token_grad_input"),
                    head_ablation=optional("head_ablation"),
                    gradient_target_value=_maybe(float, group.attrs.get("gradient_target_value")),
                    gradient_target_label=_maybe(int, group.attrs.get("gradient_target_label")),
                )
            except (KeyError, ValueError, TypeError, OSError) as err:
                raise AttnpipeError(f"{self.path}: text {index} is damaged: {_reason(err)}") from err
        check_text(self.path, item, self.meta)
        return item

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
            group = self._texts[f"{index:08d}"]
            try:
                text_id = group.attrs["id"]
                attention_ds, tokens_ds, special_ds = (group[name] for name in METRIC_DATASETS)
            except KeyError:  # looked up only now: per-name checks cost a fifth of a short text's read
                missing = [name for name in METRIC_DATASETS if name not in group] + (
                    [] if "id" in group.attrs else ["id"])
                if missing:
                    raise AttnpipeError(f"{self.path}: text {index} is damaged: it lacks {', '.join(missing)}") from None
                raise
            tokens = tuple(tokens_ds.asstr()[()])
            special = special_ds[()]
            attention = (to_float32 or decode)(read_whole(attention_ds))
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path}: text {index} is damaged: {_reason(err)}") from err
        n = len(tokens)
        expected = (len(self.meta.layers), len(self.meta.heads), n, n)
        if attention.shape != expected or len(special) != n:
            raise AttnpipeError(f"{self.path}: text {text_id!r} has attention of shape {attention.shape} and "
                                f"{len(special)} special_tokens_mask for {n} tokens; expected {expected}")
        check_rows(self.path, text_id, attention, self.meta.layers, self.meta.heads, self.meta.dtype)
        return text_id, tokens, special, attention

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
            group = self._texts[f"{index:08d}"]
            matrix = decode(group["attention"][layer, head])
            text_id = group.attrs["id"]
        except (KeyError, ValueError, TypeError, OSError) as err:
            raise AttnpipeError(f"{self.path}: text {index} is damaged: {_reason(err)}") from err
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


def _maybe(convert, value):
    """convert(value), or None for an absent (version 1 / no --target) value."""
    return None if value is None else convert(value)


def _check_version(path: Path, version: int) -> None:
    if version not in READABLE_VERSIONS:
        raise AttnpipeError(
            f"{path} has attention schema version {version}; this attnpipe reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )


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
        num_tokens_untruncated=int(sub.attrs["num_tokens_untruncated"]),
        decoder_attention=decode(group["decoder_attention"][()]),
        cross_attention=decode(group["cross_attention"][()]),
    )


def _target_from_json(data: dict, n: int) -> TargetAttention | None:
    """The decoder side of a JSON file, or None when the file holds no target."""
    if "target" not in data:
        return None
    target = data["target"]
    t = len(target["tokens"])
    decoder = np.asarray(data["decoder_attention_matrices"], dtype=np.float32)
    cross = np.asarray(data["cross_attention_matrices"], dtype=np.float32)
    for name, array, shape in (("decoder_attention_matrices", decoder, (t, t)),
                               ("cross_attention_matrices", cross, (t, n))):
        if array.ndim != 4 or array.shape[2:] != shape:
            raise AttnpipeError(f"{name} has shape {array.shape}; expected (layer, head, {shape[0]}, {shape[1]})")
    return TargetAttention(
        text=target["text"],
        tokens=tuple(target["tokens"]),
        token_ids=np.asarray(target["token_ids"], dtype=np.int64),
        special_tokens_mask=np.asarray(target["special_tokens_mask"], dtype=bool),
        labels=tuple(target["labels"]),
        label_ids=np.asarray(target["label_ids"], dtype=np.int64),
        truncated=bool(target["truncated"]),
        num_tokens_untruncated=int(target["num_tokens_untruncated"]),
        decoder_attention=decoder,
        cross_attention=cross,
    )


def _image_from_attrs(attrs) -> ImageInfo | None:
    if "image_path" not in attrs:
        return None
    path = attrs["image_path"]
    return ImageInfo(
        path=path.decode() if isinstance(path, bytes) else str(path),
        size=tuple(int(x) for x in attrs["image_size"]),
        patch_grid=tuple(int(x) for x in attrs["patch_grid"]),
        patch_size=int(attrs["patch_size"]),
    )


def _image_from_json(value: dict | None) -> ImageInfo | None:
    if value is None:
        return None
    return ImageInfo(path=str(value["path"]), size=tuple(int(x) for x in value["size"]),
                     patch_grid=tuple(int(x) for x in value["patch_grid"]),
                     patch_size=int(value["patch_size"]))


def _reason(err: Exception) -> str:
    """An exception as a short single-line reason for an error message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if isinstance(err, KeyError) else text[:200] or type(err).__name__


def _check_meta(path: Path, meta: Provenance) -> None:
    if meta.dtype not in ROW_SUM_TOL:
        raise AttnpipeError(f"{path}: unknown storage dtype {meta.dtype!r} (expected {', '.join(ROW_SUM_TOL)})")
    if not meta.layers or not meta.heads:
        raise AttnpipeError(f"{path} stores no layers or no heads")


def check_rows(path: Path, text_id: str, attention: np.ndarray, layers, heads, dtype: str) -> None:
    """Every stored row must be finite, non-negative and sum to 1 within ROW_SUM_TOL[dtype].

    attention: (L, H, n, n) with `layers`/`heads` its model indices, used in the message.
    """
    tol = ROW_SUM_TOL.get(dtype, ROW_SUM_TOL["float32"])
    if dtype == "uint8":  # each of the row's keys is rounded by at most 0.5/255
        tol += attention.shape[-1] * UINT8_ROW_SLACK

    def where(bad: np.ndarray) -> str:
        layer, head, query = (int(v) for v in np.argwhere(bad)[0][:3])
        return f"text {text_id!r} layer {layers[layer]} head {heads[head]} query {query}"

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
    for name in ("token_ids", "special_tokens_mask", "word_ids"):
        if len(getattr(item, name)) != n:
            raise AttnpipeError(f"{path}: text {item.id!r} has {len(getattr(item, name))} {name} for {n} tokens")
    check_rows(path, item.id, item.attention, meta.layers, meta.heads, meta.dtype)
    if item.target is not None:  # encoder-decoder: the decoder's and the cross-attention's rows too
        for attention in (item.target.decoder_attention, item.target.cross_attention):
            check_rows(path, item.id, attention, meta.decoder_layers, meta.decoder_heads, meta.dtype)


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


def _json_matrices(path: Path, data: dict) -> np.ndarray:
    """attention_matrices as a float32 array, refusing ragged or non-numeric nesting."""
    try:
        attention = np.asarray(data["attention_matrices"], dtype=np.float32)
    except (ValueError, TypeError) as err:
        raise AttnpipeError(
            f"{path}: attention_matrices is ragged or not numeric (every layer needs the same heads, "
            f"every matrix n x n): {_reason(err)}"
        ) from err
    n = len(data["tokens"])
    if attention.ndim != 4 or attention.shape[2:] != (n, n):
        raise AttnpipeError(
            f"{path}: attention_matrices has shape {attention.shape}; expected (layer, head, {n}, {n}) "
            f"for {n} tokens"
        )
    return attention


def _text_from_json(path: Path, data: dict) -> TextAttention:
    tokens = tuple(data["tokens"])
    n = len(tokens)
    attention = _json_matrices(path, data)

    def optional(name: str) -> np.ndarray | None:
        return np.asarray(data[name], dtype=np.float32) if name in data else None

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
        target=_target_from_json(data, n),
        input_kind=str(data.get("input_kind", "text")),
        image=_image_from_json(data.get("image")),
        attention_grad=optional("attention_grad"),
        head_gate_grad=optional("head_gate_grad"),
        token_grad_input=optional("token_grad_input"),
        head_ablation=optional("head_ablation"),
        gradient_target_value=_maybe(float, data.get("gradient_target_value")),
        gradient_target_label=_maybe(int, data.get("gradient_target_label")),
    )


def open_attention(path: Path | str, *, partial_rows: bool = False) -> AttentionFile:
    """Open an attention file for reading (use in a `with` block).

    partial_rows=True: also return the (L, H, r, n) attention of --rows cls|last files.
    """
    return AttentionFile(path, partial_rows=partial_rows)
