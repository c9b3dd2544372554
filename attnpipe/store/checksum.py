"""Checksums of attention files: every byte the writer stores is covered, and the reader checks it.

HDF5 verifies most of a file itself: with libver "v110" the superblock, object headers (numeric
attributes included) and chunk indexes carry checksums, and each chunked dataset gets the
fletcher32 filter, a 4-byte checksum appended to every chunk after compression (HDF5's own,
so plain h5py verifies it too). Two kinds of bytes escape both:

- chunks the writer compresses itself and hands HDF5 whole (write_direct_chunk): `fletcher32`
  below computes HDF5's checksum for them, and `read_whole` verifies it when it inflates a
  chunk outside HDF5;
- variable-length strings (tokens, text, ids, string attributes), which HDF5 keeps in its global
  heap, outside any checksum: each string dataset carries an attribute `crc32` and each group
  with string attributes an attribute `attrs_crc32`, the zlib CRC-32 of their UTF-8 bytes
  (`strings_crc32`). A reader checks them where present (files written before have none).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable

import numpy as np

FLETCHER32_BYTES = 4
CRC_ATTR = "crc32"  # on a string dataset: strings_crc32 of its values
ATTRS_CRC_ATTR = "attrs_crc32"  # on a group: strings_crc32 of its string attributes (attrs_crc_values)
_MOD = 65535
EXACT_WORDS = 10_000_000  # below this many 16-bit words, the second sum is exact in int64


def fletcher32(data: bytes | np.ndarray) -> int:
    """HDF5's fletcher32 (H5_checksum_fletcher32) of `data`: big-endian 16-bit words, sums mod 65535.

    The C code folds its running sums into 1..65535 (0 only while every word is 0); that equals
    ((s - 1) mod 65535) + 1 of the exact sums, which numpy computes for a whole chunk at once.
    """
    raw = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8).ravel()
    if len(raw) % 2:  # an odd last byte is the high byte of a final word
        raw = np.concatenate([raw, np.zeros(1, np.uint8)])
    words = raw.view(">u2")  # (m,)
    m = len(words)
    s1 = int(words.sum(dtype=np.int64))
    if s1 == 0:
        return 0
    if m < EXACT_WORDS:  # the exact sums fit int64: 65535 * m^2 / 2 < 2^63
        # word i enters the second sum m - i times: one int64 dot product (numpy's own loop: no
        # BLAS threads beside torch's)
        weights = _WEIGHTS[_DOT_WORDS - m:] if m <= _DOT_WORDS else np.arange(m, 0, -1, dtype=np.int64)
        s2 = int(np.dot(words.astype(np.int64), weights))
    else:
        weights = np.arange(m, 0, -1, dtype=np.int64)
        s2 = int(((words.astype(np.int64) % _MOD) * (weights % _MOD) % _MOD).sum())
    return ((((s2 % _MOD) - 1) % _MOD + 1) << 16) | ((s1 % _MOD - 1) % _MOD + 1)


_DOT_WORDS = 1 << 19  # chunks up to 1 MiB reuse these weights: word i of m gets _WEIGHTS[_DOT_WORDS - m + i] = m - i
_WEIGHTS = np.arange(_DOT_WORDS, 0, -1, dtype=np.int64)


def with_fletcher32(chunk: bytes) -> bytes:
    """A filtered chunk as HDF5's fletcher32 filter stores it: the bytes, then their checksum (LE)."""
    return chunk + fletcher32(chunk).to_bytes(FLETCHER32_BYTES, "little")


def strip_fletcher32(stored: bytes) -> bytes | None:
    """The chunk bytes without their checksum, or None when the checksum does not match.

    HDF5 also accepts the checksum byte-swapped (files of HDF5 1.6.x); so does this.
    """
    body, tail = stored[:-FLETCHER32_BYTES], stored[-FLETCHER32_BYTES:]
    found = int.from_bytes(tail, "little")
    expected = fletcher32(body)
    if found != expected and found != int.from_bytes(expected.to_bytes(4, "little"), "big"):
        return None
    return body


def strings_crc32(values: Iterable[str]) -> int:
    """CRC-32 of strings' UTF-8 bytes, each followed by NUL (which HDF5 strings cannot hold)."""
    crc = 0
    for value in values:
        crc = zlib.crc32(value.encode("utf-8", "surrogatepass") + b"\x00", crc)
    return crc


def attrs_crc_values(attrs) -> list[str]:
    """A group's string attributes as `name=value` in name order: what ATTRS_CRC_ATTR covers."""
    values = []
    for name in sorted(attrs):
        if name == ATTRS_CRC_ATTR:
            continue
        value = attrs[name]
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        if isinstance(value, str):
            values.append(f"{name}={value}")
    return values
