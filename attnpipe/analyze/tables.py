"""Writing analysis tables: long-format DataFrames as Parquet + CSV, plus a JSON sidecar.

Every file is written to a temporary file in the output folder and renamed over the target only
when complete (`os.replace`), so a failed run never leaves a partial table.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd

from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import atomic_path


def prepare_output_dir(folder: Path) -> Path:
    """Create `folder` (and parents) if needed; fail clearly if it is a file or not writable."""
    if folder.exists() and not folder.is_dir():
        raise AttnpipeError(f"--output-dir {folder} exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise AttnpipeError(f"cannot create --output-dir {folder}: {err.strerror}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AttnpipeError(f"--output-dir {folder} is not writable")
    return folder


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """Call `write(tmp)` on a temporary file beside `path`, then rename it to `path`."""
    with atomic_path(path) as tmp:
        write(tmp)
    return path


def write_table(table: pd.DataFrame, folder: Path, stem: str) -> list[Path]:
    """`stem`.parquet and `stem`.csv in `folder`; categorical columns are stored as strings."""
    plain = table.copy()
    for column in plain.columns:
        if isinstance(plain[column].dtype, pd.CategoricalDtype):
            plain[column] = plain[column].astype(str)
    return [
        write_atomic(folder / f"{stem}.parquet", lambda tmp: plain.to_parquet(tmp, index=False)),
        write_atomic(folder / f"{stem}.csv", lambda tmp: plain.to_csv(tmp, index=False)),
    ]


def write_json(payload: dict, path: Path) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                       encoding="utf-8")

    return write_atomic(path, write)


@contextmanager
def staged_output_dir(folder: Path) -> Iterator[Path]:
    """A hidden folder inside `folder` to write a command's whole set of outputs into.

    When the block succeeds, each file is renamed into `folder` (renames within one file system
    need no room, so they do not fail as writes do); when it fails (disk full, an error, Ctrl-C,
    SIGTERM) the folder is removed and `folder` keeps its previous set of outputs, never a mix of
    new and old tables. A folder left by a SIGKILL is named `.attnpipe-*.tmp` and can be deleted.
    """
    folder = prepare_output_dir(folder)
    stage = Path(tempfile.mkdtemp(prefix=".attnpipe-", suffix=".tmp", dir=folder))
    try:
        yield stage
        for path in sorted(p for p in stage.rglob("*") if p.is_file()):
            target = folder / path.relative_to(stage)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
