"""Damaged attention files, generated: every way the reliability suite breaks a valid file.

    python tests/damaged_files.py OUT_DIR [--all]    # writes OUT_DIR/<variant>.h5 and lists them

Each variant starts from a valid HDF5 file (three texts, from H5Writer) and changes one thing:
one bit flipped in a region (every chunk of every dataset, the string heap, the metadata the
rest of the file holds), a truncation, a deleted or retyped field, relabelled layers, heads or
ids, a soft or external link, an unwritten chunk. tests/test_damaged_files.py runs every reading
command on each: the answer must be one `error:` line, or exactly the undamaged file's output.
"""

from __future__ import annotations

import dataclasses
import random
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from attnpipe.store import H5Writer, Storage  # noqa: E402
from test_corrupt_inputs import META, valid_item  # noqa: E402

Variant = tuple[str, Callable[[Path], None]]
BASES = {  # name -> storage of the valid file a variant starts from
    "gzip": Storage(dtype="float32", compression="gzip"),
    "lzf": Storage(dtype="float16", compression="lzf"),
    "none": Storage(dtype="uint8", compression="none"),
}


def write_base(path: Path, storage: Storage) -> Path:
    items = [valid_item("a", 4, 0), valid_item("b", 7, 1), valid_item("c", 5, 2)]
    with H5Writer(path, len(items), storage.dtype, storage) as writer:
        for index, item in enumerate(items):
            writer.write(index, item)
        writer.finish(dataclasses.replace(META, dtype=storage.dtype))
    return path


# ----------------------------------------------------------------------------- regions of the bytes


def regions(path: Path) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of a file by what they hold: chunks of each dataset, contiguous data, the
    string heap (found by the strings it holds), and the rest (superblock, headers, indexes)."""
    found: dict[str, list[tuple[int, int]]] = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if not isinstance(obj, h5py.Dataset):
                return
            kind = "chunk:" + name.rsplit("/", 1)[-1]
            if obj.chunks is not None:
                for i in range(obj.id.get_num_chunks()):
                    info = obj.id.get_chunk_info(i)
                    found.setdefault(kind, []).append((info.byte_offset, info.byte_offset + info.size))
            elif obj.id.get_offset() is not None:
                start = obj.id.get_offset()
                found.setdefault("contiguous:" + name.rsplit("/", 1)[-1], []).append(
                    (start, start + obj.id.get_storage_size()))
        f.visititems(visit)
    data = path.read_bytes()
    heap = []
    for needle in (b"w0 w1", b"[CLS]", b"attnpipe-attention", b"/models/tiny"):
        at = data.find(needle)
        while at >= 0:
            heap.append((at, at + len(needle)))
            at = data.find(needle, at + 1)
    found["string-heap"] = heap
    taken = sorted(r for rs in found.values() for r in rs)
    rest, last = [], 0
    for start, stop in taken:
        if start > last:
            rest.append((last, start))
        last = max(last, stop)
    rest.append((last, len(data)))
    found["metadata"] = [r for r in rest if r[1] > r[0]]
    return found


def flip(position: int, bit: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[position] ^= 1 << bit
        path.write_bytes(bytes(data))
    return apply


def truncate(size: int) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        path.write_bytes(path.read_bytes()[:size])
    return apply


def edit(change: Callable[[h5py.File], None]) -> Callable[[Path], None]:
    def apply(path: Path) -> None:
        with h5py.File(path, "r+") as f:
            change(f)
    return apply


def set_attr(where: str, key: str, value) -> Callable[[h5py.File], None]:
    return lambda f: f[where].attrs.__setitem__(key, value)


def del_attr(where: str, key: str) -> Callable[[h5py.File], None]:
    return lambda f: f[where].attrs.__delitem__(key)


def replace_dataset(where: str, convert: Callable[[np.ndarray], np.ndarray], **options) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        values = f[where][()]
        attrs = dict(f[where].attrs)
        del f[where]
        f.create_dataset(where, data=convert(values), **options)
        for key, value in attrs.items():
            f[where].attrs[key] = value
    return change


def soft_link(where: str, target: str) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        del f[where]
        f[where] = h5py.SoftLink(target)
    return change


def external_link(where: str, file: str, target: str) -> Callable[[h5py.File], None]:
    def change(f: h5py.File) -> None:
        del f[where]
        f[where] = h5py.ExternalLink(file, target)
    return change


def unwritten_chunk(f: h5py.File) -> None:
    """Text 1's attention chunked per layer with layer 1's chunk never written (reads as 0)."""
    where = "texts/00000001/attention"
    values = f[where][()]
    attrs = dict(f[where].attrs)
    del f[where]
    dataset = f.create_dataset(where, shape=values.shape, dtype=values.dtype, chunks=(1, *values.shape[1:]))
    dataset[0] = values[0]
    for key, value in attrs.items():
        dataset.attrs[key] = value


def structural_variants(fifo: Path | None) -> Iterator[Variant]:
    t0, t1 = "texts/00000000", "texts/00000001"
    yield "deleted-ids", edit(lambda f: f.__delitem__("ids"))
    yield "deleted-text-group", edit(lambda f: f.__delitem__("texts/00000002"))
    for name in ("text", "attention", "token_ids", "tokens", "special_tokens_mask", "offsets", "word_ids"):
        yield f"deleted-{name}", edit(lambda f, n=name: f.__delitem__(f"{t1}/{n}"))
    for key in ("schema_version", "format", "layers", "heads", "num_layers", "dtype", "model_type", "attrs_crc32"):
        yield f"deleted-root-{key}", edit(del_attr("/", key))
    for key in ("id", "truncated", "num_tokens_untruncated", "attrs_crc32"):
        yield f"deleted-text-{key}", edit(del_attr(t1, key))
    for label, value in (("string", "2"), ("float", 2.9), ("bool", True), ("huge", 2**62)):
        yield f"retyped-schema_version-{label}", edit(set_attr("/", "schema_version", value))
    yield "retyped-layers-float", edit(set_attr("/", "layers", np.array([0.0, 1.5])))
    yield "retyped-num_layers-string", edit(set_attr("/", "num_layers", "2"))
    yield "retyped-num_heads-nan", edit(set_attr("/", "num_heads", np.nan))
    yield "retyped-dtype-number", edit(set_attr("/", "dtype", 5))
    yield "retyped-text-id-number", edit(set_attr(t1, "id", 5))
    yield "retyped-truncated-string", edit(set_attr(t1, "truncated", "no"))
    yield "retyped-token_ids-float", edit(replace_dataset(f"{t1}/token_ids", lambda v: v + 0.5))
    yield "retyped-mask-int8", edit(replace_dataset(f"{t1}/special_tokens_mask", lambda v: v.astype(np.int8) * 2))
    yield "retyped-tokens-ints", edit(replace_dataset(f"{t1}/tokens", lambda v: np.arange(len(v))))
    yield "retyped-attention-2d", edit(replace_dataset(f"{t1}/attention", lambda v: v.reshape(-1, v.shape[-1])))
    yield "relabelled-layers-reversed", edit(set_attr("/", "layers", np.array([1, 0])))
    yield "relabelled-layers-repeated", edit(set_attr("/", "layers", np.array([0, 0])))
    yield "relabelled-layers-out-of-range", edit(set_attr("/", "layers", np.array([0, 5])))
    yield "relabelled-heads-unsorted", edit(set_attr("/", "heads", np.array([2, 0, 1])))
    yield "relabelled-heads-negative", edit(set_attr("/", "heads", np.array([-1, 0, 1])))
    yield "relabelled-ids-swapped", edit(replace_dataset("ids", lambda v: v[[1, 0, 2]], dtype=h5py.string_dtype()))
    yield "relabelled-ids-duplicate", edit(replace_dataset("ids", lambda v: v[[0, 0, 2]], dtype=h5py.string_dtype()))
    yield "relabelled-text-id", edit(set_attr(t1, "id", "zz"))
    yield "link-soft-text-group", edit(soft_link("texts/00000002", "/texts/00000001"))
    yield "link-soft-attention", edit(soft_link(f"{t0}/attention", f"/{t1}/attention"))
    yield "link-external-attention", edit(external_link(f"{t1}/attention", "other.h5", "/data"))
    yield "link-external-ids", edit(external_link("ids", "other.h5", "/ids"))
    if fifo is not None:
        yield "link-external-fifo", edit(external_link(f"{t1}/tokens", str(fifo), "/x"))
    yield "unwritten-chunk", edit(unwritten_chunk)


def variants(base: Path, everything: bool, fifo: Path | None = None, seed: int = 0) -> Iterator[Variant]:
    """(name, breakage) pairs for the valid file `base`: a few per kind by default, hundreds with
    `everything`."""
    rng = random.Random(seed)
    size = base.stat().st_size
    per_region = 6 if everything else 1
    for region, ranges in sorted(regions(base).items()):
        positions = [p for start, stop in ranges for p in range(start, stop)]
        for position in rng.sample(positions, min(per_region, len(positions))):
            bit = rng.randrange(8)
            yield f"bitflip-{region}-{position}-{bit}", flip(position, bit)
    cuts = [size // 10, size // 2, size - 1] if not everything else sorted(
        {size * k // 20 for k in range(1, 20)} | {1, 8, 512, size - 4096, size - 1})
    for cut in cuts:
        yield f"truncated-{cut}", truncate(cut)
    yield from structural_variants(fifo)


def main(argv: list[str]) -> int:
    out = Path(argv[0])
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    for kind, storage in BASES.items():
        base = write_base(out / f"valid-{kind}.h5", storage)
        for name, breakage in variants(base, "--all" in argv):
            path = out / f"{kind}-{name}.h5"
            shutil.copy(base, path)
            breakage(path)
            count += 1
    print(f"{count} damaged files in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
