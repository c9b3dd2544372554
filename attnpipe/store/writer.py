"""The HDF5 attention writer (many texts, streamed) and the choice of writer for an output path.

The layout it writes is the spec in attnpipe.store.format. The file appears only when `finish`
succeeds (atomic rename); the room on disk is checked before each text.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np

from attnpipe import faults
from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import WRITE_MARGIN_BYTES, AtomicFile, check_writable, write_errors  # noqa: F401 (re-exported)
from attnpipe.store.checksum import ATTRS_CRC_ATTR, CRC_ATTR, attrs_crc_values, strings_crc32
from attnpipe.store.codec import chunk_shape, encode_chunk, to_storage
from attnpipe.store.format import (DIMS, FORMAT_NAME, OUTPUT_SUFFIXES, TARGET_ATTRIBUTIONS, TEXT_ATTRIBUTIONS, UINT8_SCALE,
                                   Provenance, Storage, StorageDtype, TargetAttention, TextAttention,
                                   provenance_attrs, query_positions, text_bytes_bound)
from attnpipe.store.json_file import JSONWriter
from attnpipe.store.validate import check_gradient_shapes, check_no_nul


def check_output_path(path: Path) -> None:
    """Fail before any work if the output cannot be written: suffix, folder, permissions."""
    if path.suffix not in OUTPUT_SUFFIXES:
        raise AttnpipeError(
            f"unknown output type {path.suffix or '(none)'!r} for {path}: "
            "use .json (one text) or .h5 (any number of texts)"
        )
    check_writable(path)


def checked_dataset(group: h5py.Group, name: str, data, **options) -> h5py.Dataset:
    """group.create_dataset(name, data=data, ...) with every stored byte checked on read
    (attnpipe.store.checksum): fletcher32 on the chunks of a non-empty numeric array (HDF5
    cannot chunk a scalar or an empty dataset), and on a string dataset, whose values HDF5 keeps
    in its global heap (and which takes no filters), a `crc32` attribute of its values."""
    strings = options.get("dtype") is not None and h5py.check_string_dtype(np.dtype(options["dtype"])) is not None
    if not strings and np.size(data) and np.ndim(data) > 0:
        options.setdefault("fletcher32", True)
    dataset = group.create_dataset(name, data=data, **options)
    if strings:
        dataset.attrs[CRC_ATTR] = np.uint32(strings_crc32([data] if isinstance(data, str) else data))
    return dataset


def seal_attrs(obj) -> None:
    """Record the CRC-32 of an HDF5 object's string attributes (attnpipe.store.checksum): they
    live in the global heap, which no HDF5 checksum covers. Call after its last string attribute."""
    obj.attrs[ATTRS_CRC_ATTR] = np.uint32(strings_crc32(attrs_crc_values(obj.attrs)))


def write_metrics_group(file: h5py.File, values: np.ndarray, names, causal: np.ndarray) -> None:
    """The /metrics group of a --metrics-only file: (N, L, H, M) values, metric names, (N,) causal.
    Written by H5Writer and by attnpipe.store.merge (the shards' arrays concatenated)."""
    group = file.create_group("metrics")
    dataset = checked_dataset(group, "values", data=np.asarray(values, dtype=np.float64))
    dataset.attrs["dims"] = "text,layer,head,metric"
    checked_dataset(group, "names", data=list(names), dtype=h5py.string_dtype())
    checked_dataset(group, "causal", data=np.asarray(causal, dtype=bool))



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
    (the streaming path of attnpipe.extract.runner); both give the same bytes. Not thread-safe:
    one thread makes all calls (the runner gives them to one writer thread).
    """

    def __init__(self, path: Path, num_texts: int, dtype: StorageDtype, storage: Storage | None = None):
        self.path = path
        self.storage = Storage(dtype=dtype, schema_version=2) if storage is None else storage
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
        self._sums: dict[str, list[np.ndarray]] = {  # corpus means of the per-text head scores
            f"{prefix}head_{score}_mean": [] for prefix in ("", "decoder_", "cross_")
            for score in ("importance", "ablation")}

    def begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        """Store text `index`'s tokens (and any target, image or gradient fields) and an empty
        attention dataset for its chunks.

        `item.attention` is not read (it may be None); `item.query_positions` must match the
        writer's `rows` when they are not all rows.
        """
        check_no_nul(item)
        self._atomic.check_room(text_bytes_bound(item, num_layers, num_heads, self.dtype.itemsize, self.storage.rows))
        with write_errors(self.path):
            self._begin(index, item, num_layers, num_heads)

    def _begin(self, index: int, item: TextAttention, num_layers: int, num_heads: int) -> None:
        n = item.num_tokens
        group = self._texts.create_group(f"{index:08d}")
        group.attrs["id"] = item.id
        group.attrs["truncated"] = bool(item.truncated)
        group.attrs["num_tokens_untruncated"] = int(item.num_tokens_untruncated)
        checked_dataset(group, "text", data=item.text, dtype=h5py.string_dtype())
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
                checked_dataset(group, "query_positions", data=rows)
            self._attention[index] = dataset
            faults.point("write")
        checked_dataset(group, "token_ids", data=np.asarray(item.token_ids).astype(np.int64))
        checked_dataset(group, "tokens", data=list(item.tokens), dtype=h5py.string_dtype())
        checked_dataset(group, "special_tokens_mask", data=np.asarray(item.special_tokens_mask).astype(bool))
        checked_dataset(group, "offsets", data=np.asarray(item.offsets).astype(np.int64).reshape(-1, 2))
        checked_dataset(group, "word_ids", data=np.asarray(item.word_ids).astype(np.int64))
        if item.generated is not None:  # generated text (version 2): which tokens the model wrote
            checked_dataset(group, "generated", data=np.asarray(item.generated).astype(bool))
        if item.generated_text is not None:
            checked_dataset(group, "generated_text", data=item.generated_text, dtype=h5py.string_dtype())
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
        seal_attrs(group)
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
        check_gradient_shapes(self.path, item)  # a gradient that does not fit its attention is never stored
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
        checked_dataset(sub, "text", data=target.text, dtype=h5py.string_dtype())
        checked_dataset(sub, "tokens", data=list(target.tokens), dtype=h5py.string_dtype())
        checked_dataset(sub, "token_ids", data=target.token_ids.astype(np.int64))
        checked_dataset(sub, "special_tokens_mask", data=target.special_tokens_mask.astype(bool))
        checked_dataset(sub, "labels", data=list(target.labels), dtype=h5py.string_dtype())
        checked_dataset(sub, "label_ids", data=target.label_ids.astype(np.int64))
        if target.generated is not None:
            checked_dataset(sub, "generated", data=np.asarray(target.generated).astype(bool))
        if target.decoder_attention_grad is not None:
            self._write_target_gradients(group, target)

    def _write_gradients(self, group, item: TextAttention) -> None:
        """Version 2's optional gradient datasets (see the module docstring)."""
        group.attrs["gradient_target_value"] = float(item.gradient_target_value)
        group.attrs["gradient_target_label"] = int(item.gradient_target_label)
        self._gradient_datasets(group, "", item.attention_grad, item.head_gate_grad, item.head_ablation)
        checked_dataset(group, "token_grad_input", data=item.token_grad_input.astype(np.float32))
        self._attribution_datasets(group, {name: getattr(item, name) for name in TEXT_ATTRIBUTIONS})

    def _attribution_datasets(self, group, fields: dict[str, np.ndarray | None]) -> None:
        """--attribution ig: float32, matrices chunked and compressed like attention_grad."""
        for name, values in fields.items():
            if values is None:
                continue
            if values.ndim == 4:
                heads, rows, cols = values.shape[1:]
                dataset = checked_dataset(
                    group, name, data=values.astype(np.float32), chunks=(1, heads, rows, cols) if rows and cols else None,
                    compression="gzip" if rows and cols else None, shuffle=bool(rows and cols))
                dataset.attrs["dims"] = ",".join(DIMS)
            else:  # (L,) per stored layer
                checked_dataset(group, name, data=values.astype(np.float32))

    def _write_target_gradients(self, group, target: TargetAttention) -> None:
        """An encoder-decoder's decoder and cross-attention gradients, beside decoder_attention."""
        self._gradient_datasets(group, "decoder_", target.decoder_attention_grad, target.decoder_head_gate_grad,
                                target.decoder_head_ablation)
        self._gradient_datasets(group, "cross_", target.cross_attention_grad, target.cross_head_gate_grad,
                                target.cross_head_ablation)
        self._attribution_datasets(group, {name: getattr(target, name) for name in TARGET_ATTRIBUTIONS})

    def _gradient_datasets(self, group, prefix: str, attention_grad: np.ndarray, gate_grad: np.ndarray,
                           ablation: np.ndarray | None) -> None:
        """<prefix>attention_grad (L, H, q, k), <prefix>head_gate_grad / _importance / _ablation (L, H):
        float32, whatever the storage dtype; the head scores also go into the corpus means."""
        heads, rows, cols = attention_grad.shape[1:]
        grad = checked_dataset(
            group, f"{prefix}attention_grad", data=attention_grad.astype(np.float32),
            chunks=(1, heads, rows, cols) if rows and cols else None,
            compression="gzip" if rows and cols else None, shuffle=bool(rows and cols),
            fletcher32=bool(rows and cols),
        )
        grad.attrs["dims"] = ",".join(DIMS)
        importance = np.abs(gate_grad)
        checked_dataset(group, f"{prefix}head_gate_grad", data=gate_grad.astype(np.float32))
        checked_dataset(group, f"{prefix}head_importance", data=importance.astype(np.float32))
        self._sums[f"{prefix}head_importance_mean"].append(importance.astype(np.float64))
        if ablation is not None:
            checked_dataset(group, f"{prefix}head_ablation", data=ablation.astype(np.float32))
            self._sums[f"{prefix}head_ablation_mean"].append(ablation.astype(np.float64))

    def finish(self, provenance: Provenance) -> None:
        missing = [i for i, text_id in enumerate(self._ids) if text_id is None]
        if missing:
            raise RuntimeError(f"texts {missing[:5]} were never written")
        self._atomic.check_room(sum(len(i.encode()) + 16 for i in self._ids))
        with write_errors(self.path):
            checked_dataset(self._file, "ids", data=self._ids, dtype=h5py.string_dtype())
            for name, values in self._sums.items():
                if values:
                    checked_dataset(self._file, name, data=np.mean(values, axis=0).astype(np.float32))
            faults.point("finish")
            if self.storage.metrics_only and "metrics" not in self._file:
                raise RuntimeError("a metrics-only file needs write_metrics before finish")
            self._file.attrs["format"] = FORMAT_NAME
            self._file.attrs["dims"] = ",".join(DIMS)
            for key, value in provenance_attrs(provenance).items():
                self._file.attrs[key] = value
            self._file.attrs["compression"] = self.storage.compression
            self._file.attrs["compression_level"] = self.storage.level if self.storage.compression == "gzip" else -1
            self._file.attrs["rows"] = self.storage.rows
            self._file.attrs["metrics_only"] = bool(self.storage.metrics_only)
            seal_attrs(self._file)
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


def h5_writer(path: Path, num_texts: int, dtype: StorageDtype, storage: Storage | None = None,
              *, encode_threads: int = 1):
    """The HDF5 writer of `storage.schema_version`: store.packed.PackedWriter (3, also without a
    storage; `encode_threads` compress its attention chunks) or H5Writer (2)."""
    if storage is None or storage.schema_version == 3:
        from attnpipe.store.packed import PackedWriter

        return PackedWriter(path, num_texts, dtype, storage, encode_threads=encode_threads)
    return H5Writer(path, num_texts, dtype, storage)


def open_writer(path: Path, num_texts: int, dtype: StorageDtype) -> H5Writer | JSONWriter:
    """The writer for `path`'s format: HDF5 streams texts, JSON holds its one text (use in `with`)."""
    return JSONWriter(path) if path.suffix == ".json" else h5_writer(path, num_texts, dtype)
