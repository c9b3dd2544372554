"""Atomic writes: every output appears complete or not at all.

A temporary file is made in the target's own folder (so the final rename never crosses file
systems) and renamed over the target only when writing succeeded; on any error it is removed
and an existing target is left untouched. A missing output folder (and its missing parents) is
created when the temporary file is made, and removed again, if still empty, when it is discarded.
"""

from __future__ import annotations

import errno
import os
import re
import resource
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from attnpipe.errors import AttnpipeError

WRITE_MARGIN_BYTES = 1 << 16  # room asked beyond a text's own bytes (HDF5's metadata, chunk headers)


class AtomicFile:
    """A temporary file beside `path` that becomes `path` on `commit` and vanishes on `discard`."""

    def __init__(self, path: Path):
        self.path = path
        self.created = make_folder(path.parent)  # missing folders made now, deepest first
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        except BaseException:
            self._remove_created()
            raise
        os.close(fd)
        self.tmp = Path(tmp)

    def commit(self) -> None:
        os.chmod(self.tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)
        self._remove_created()

    def check_room(self, nbytes: int, unwritten: int = 0) -> None:
        """Refuse before HDF5 writes what the disk or the file-size limit cannot take.

        HDF5 copes badly with a write failing inside its caches (errors while objects are freed,
        sometimes a crash), so room for the next `nbytes` (a text's uncompressed bytes) plus a
        margin is checked first: a conservative estimate, as compression only makes data smaller.
        `unwritten`: bytes the writer holds in memory, not yet in the temp file.
        """
        size = self.tmp.stat().st_size + unwritten
        stat = os.statvfs(self.tmp.parent)
        room, what = stat.f_bavail * stat.f_frsize - unwritten, "free disk space"
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

    def _remove_created(self) -> None:
        for folder in self.created:  # only the folders this write made, and only while empty
            try:
                folder.rmdir()
            except OSError:
                break


@contextmanager
def write_errors(path: Path) -> Iterator[None]:
    """Turn an OS-level write failure (disk full, file-size limit, quota) into one clear error."""
    try:
        yield
    except OSError as err:
        text = " ".join(str(err).split()) or type(err).__name__  # h5py's messages span lines
        found = re.search(r"error message = '([^']+)'", text)  # HDF5 quotes the OS error so
        reason = os.strerror(err.errno) if err.errno else found.group(1) if found else text[:300]
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
            hint in text for hint in ("File too large", "No space left", "quota exceeded")
        ):
            reason += " (disk full or file-size limit?)"
        raise AttnpipeError(f"could not write {path}: {reason}") from err


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the block succeeds.

    An OSError while writing (disk full, file-size limit) becomes one AttnpipeError naming `path`.
    """
    with write_errors(path):
        atomic = AtomicFile(path)
        try:
            yield atomic.tmp
            atomic.commit()
        except BaseException:
            atomic.discard()
            raise


def make_folder(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones made, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    if missing:
        missing[0].mkdir(parents=True, exist_ok=True)
    return missing


def check_folder(folder: Path) -> None:
    """Fail before any work if outputs cannot go into `folder`: it is a file, or it (or the nearest
    folder above it that exists, where it will be created) is read-only. Nothing is created here."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise AttnpipeError(f"output folder {folder} cannot be made: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise AttnpipeError(f"output folder is not writable: {existing}")


def check_writable(path: Path) -> None:
    """Fail before any work if `path` cannot be written: its folder is a file or read-only
    (a missing folder is created when the output is written), or `path` is a folder."""
    check_folder(path.parent if str(path.parent) else Path("."))
    if path.is_dir():
        raise AttnpipeError(f"output path is a folder: {path}")


def _same_or_inside(path: Path, other: Path) -> bool:
    try:
        path, other = path.resolve(), other.resolve()
    except (OSError, RuntimeError):  # a symlink loop: compared as given
        pass
    return path == other or other in path.parents


def check_not_an_input(output: Path, inputs=(), model_dirs=()) -> None:
    """Refuse an output path that would replace one of the command's own inputs, or that lies
    inside a model folder (an output named MODEL/config.json would overwrite the model)."""
    flat = []
    for given in inputs:  # argparse gives some flags as lists (--image A B, --image-dir D)
        flat += list(given) if isinstance(given, (list, tuple)) else [given]
    for given in flat:
        if given is not None and Path(given).exists() and _same_or_inside(output, Path(given)):
            raise AttnpipeError(f"the output {output} is the input {given}: writing it would replace the input; "
                                "choose another output path")
    for folder in model_dirs:
        if folder is not None and Path(folder).is_dir() and _same_or_inside(output, Path(folder)):
            raise AttnpipeError(f"the output {output} is inside the model folder {folder}: writing there could "
                                "overwrite the model's own files; choose a path outside it")
