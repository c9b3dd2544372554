"""Chunks of attention as bytes: storage dtype conversion, chunk shapes, deflate(+shuffle) coding.

The writer compresses chunks itself (encode_chunk, with the GIL released) and hands HDF5 the
bytes; the reader inflates whole datasets the same way (read_whole). Either produces or reads
standard HDF5 gzip chunks, so plain h5py reads the files too (see attnpipe.store.format).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections import OrderedDict

import deflate
import h5py
import numpy as np
from isal import isal_zlib

from attnpipe.store.checksum import strip_fletcher32, with_fletcher32
from attnpipe.store.format import CHUNK_TARGET_BYTES, UINT8_SCALE, Storage, StorageDtype


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
        return with_fletcher32(chunk.tobytes())  # the last filter of every pipeline (Storage.h5_filters)
    assert storage.compression == "gzip", "lzf chunks are compressed by h5py itself"
    return with_fletcher32(deflate_bytes(_shuffle(chunk), storage.level))


def _shuffle(chunk: np.ndarray) -> bytes:
    """HDF5's shuffle filter: byte k (little-endian) of every element, then byte k + 1, ...

    Shifts of the whole chunk, each truncated into its run of bytes: 2-3x numpy's transposing copy.
    """
    if chunk.itemsize == 1:
        return chunk.tobytes()
    values = chunk.reshape(-1).view(f"<u{chunk.itemsize}")
    runs = np.empty((chunk.itemsize, len(values)), np.uint8)
    for k in range(chunk.itemsize):
        runs[k] = values >> (8 * k) if k else values  # assignment keeps the low byte
    return runs.tobytes()


# Filter pipelines read_whole inflates itself: what H5Writer writes with gzip (with fletcher32
# from issue 16 on, without it before).
_DEFLATE, _SHUFFLE, _FLETCHER = h5py.h5z.FILTER_DEFLATE, h5py.h5z.FILTER_SHUFFLE, h5py.h5z.FILTER_FLETCHER32
_INFLATED_PIPELINES = ((_DEFLATE,), (_SHUFFLE, _DEFLATE), (_DEFLATE, _FLETCHER), (_SHUFFLE, _DEFLATE, _FLETCHER))


class ChecksumMismatch(OSError):
    """A chunk's bytes differ from what was written (an OSError, as h5py's own read errors are)."""


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
    checked = pipeline[-1] == _FLETCHER
    out = None if chunks == shape else np.empty(shape, dtype)
    try:
        for offset in itertools.product(*(range(0, size, step) for size, step in zip(shape, chunks))):
            skipped, raw = dataset.id.read_direct_chunk(offset)
            if skipped:
                return dataset[()]
            if checked:
                raw = strip_fletcher32(raw)
                if raw is None:
                    raise ChecksumMismatch(f"the fletcher32 checksum of chunk {offset} of {dataset.name} "
                                           "does not match: the file is damaged")
            data = np.frombuffer(deflate.zlib_decompress(raw, chunk_bytes), np.uint8)
            if _SHUFFLE in pipeline and itemsize > 1:
                data = _unshuffle(data, itemsize)
            else:
                data = data.copy()  # writable
            chunk = data.view(dtype).reshape(chunks)
            if out is None:
                return chunk
            region = tuple(slice(start, min(start + step, size)) for start, step, size in zip(offset, chunks, shape))
            out[region] = chunk[tuple(slice(0, r.stop - r.start) for r in region)]
    except ChecksumMismatch:
        raise  # not h5py's fallback: it would say only "filter returned failure"
    except (OSError, ValueError, KeyError, deflate.DeflateError):
        return dataset[()]
    return out


# What ChunkRanges reads itself: PackedWriter's gzip and uncompressed chunks, each with fletcher32.
_RANGE_PIPELINES = ((_FLETCHER,), (_DEFLATE, _FLETCHER), (_SHUFFLE, _DEFLATE, _FLETCHER))


class ChunkRanges:
    """values[start:stop] of a 1-D chunked dataset (schema version 3's packed values), a chunk at a
    time outside HDF5, the last KEEP chunks kept: one matrix from a big file costs one or two chunks.

    A chunk is read with read_direct_chunk, its fletcher32 checksum verified here (over all its
    stored bytes, as HDF5 does) and inflated by ISA-L only as far as the range needs (with shuffle,
    byte k of every value is in run k, so up to the last run). Other pipelines (lzf, files written
    without fletcher32), a skipped filter or a chunk that will not inflate go through h5py, which
    reads or reports them as before. h5py's slicing costs ~0.1 ms of Python per call and inflates
    the whole 256 KiB chunk with zlib, then unshuffles it byte by byte.
    """

    KEEP = 4

    def __init__(self, dataset: h5py.Dataset):
        self.dataset = dataset
        self.length = dataset.shape[0] if dataset.ndim == 1 else 0
        self.dtype = dataset.dtype
        chunks = dataset.chunks
        plist = dataset.id.get_create_plist()
        pipeline = tuple(plist.get_filter(i)[0] for i in range(plist.get_nfilters()))
        little_endian = self.dtype.byteorder in "<|" or (self.dtype.byteorder == "=" and sys.byteorder == "little")
        self.direct = (dataset.ndim == 1 and chunks is not None and pipeline in _RANGE_PIPELINES and little_endian
                       and self.dtype.kind in "biuf" and self.dtype.itemsize in (1, 2, 4, 8))
        self.chunk = chunks[0] if chunks else 0
        self.itemsize = self.dtype.itemsize
        self.deflated = _DEFLATE in pipeline
        self.shuffled = _SHUFFLE in pipeline and self.itemsize > 1
        self._kept: OrderedDict[int, list] = OrderedDict()  # chunk -> [stored bytes, inflated prefix]

    def read(self, start: int, stop: int) -> np.ndarray:
        """A copy of values[start:stop] in the stored dtype."""
        if not self.direct:
            return self.dataset[start:stop]
        if not 0 <= start <= stop <= self.length:
            raise ValueError(f"values [{start}, {stop}) lie outside {self.dataset.name} of {self.length} values")
        out = np.empty(stop - start, self.dtype)
        out_bytes = out.view(np.uint8).reshape(-1, self.itemsize)  # (values, bytes of each)
        pos, c = start, self.chunk
        while pos < stop:
            k = pos // c
            end = min(stop, (k + 1) * c)
            if not self._piece(k, pos - k * c, end - k * c, out_bytes[pos - start:end - start]):
                return self.dataset[start:stop]
            pos = end
        return out

    def _piece(self, k: int, a: int, b: int, out: np.ndarray) -> bool:
        """Values a..b of chunk k into out (b - a, itemsize) uint8; False where h5py must read it."""
        c, size = self.chunk, self.itemsize
        need = (size - 1) * c + b if self.shuffled else b * size  # inflated bytes the values need
        entry = self._kept.get(k)
        try:
            if entry is None:
                skipped, stored = self.dataset.id.read_direct_chunk((k * c,))
                if skipped:
                    return False
                body = strip_fletcher32(stored)
                if body is None:
                    raise ChecksumMismatch(f"the fletcher32 checksum of chunk {k * c} of {self.dataset.name} "
                                           "does not match: the file is damaged")
                entry = self._kept[k] = [body, b""]
                if len(self._kept) > self.KEEP:
                    self._kept.popitem(last=False)
            else:
                self._kept.move_to_end(k)
            if len(entry[1]) < need:
                entry[1] = isal_zlib.decompressobj().decompress(entry[0], need) if self.deflated else entry[0]
        except ChecksumMismatch:
            raise
        except (OSError, ValueError, KeyError, isal_zlib.error):
            return False
        if len(entry[1]) < need:  # a chunk shorter than its dataset's chunks
            return False
        data = np.frombuffer(entry[1], np.uint8)
        if self.shuffled:  # run p holds byte p (little-endian) of every value of the chunk
            _join_runs([data[p * c + a:p * c + b] for p in range(size)], out.view(f"<u{size}").reshape(-1))
        else:
            out.reshape(-1)[:] = data[a * size:b * size]
        return True


def _unshuffle(data: np.ndarray, itemsize: int) -> np.ndarray:
    """HDF5's shuffle undone: run k of `data` holds byte k (little-endian) of every value."""
    runs = data.reshape(itemsize, -1)
    return _join_runs(list(runs), np.empty(runs.shape[1], f"<u{itemsize}"))


def _join_runs(runs: list[np.ndarray], values: np.ndarray) -> np.ndarray:
    """values[i] = the little-endian integer of bytes runs[0][i], runs[1][i], ...: shifts and ors
    on whole runs, 10x numpy's transposing copy (or one strided byte copy per run)."""
    values[:] = runs[-1]
    for run in reversed(runs[:-1]):
        values <<= 8
        values |= run
    return values


def deflate_bytes(raw: bytes, level: int) -> bytes:
    """A zlib stream of `raw`: ISA-L at levels 0-3, libdeflate at 4-12 (both faster than zlib)."""
    if level <= 3:
        return isal_zlib.compress(raw, level)
    return deflate.zlib_compress(raw, level)
