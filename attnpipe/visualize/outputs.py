"""Where visualize_attention.py's outputs go: suffix checks and atomic writes.

Every output is written to a temporary file in the target folder and renamed over the target
only when complete (`os.replace`), so a failed run leaves nothing behind and never touches an
existing file.
"""

from __future__ import annotations

from pathlib import Path

from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import atomic_path, check_writable

FIGURE_SUFFIXES = (".png", ".svg", ".pdf")
SUFFIXES = {"figure": FIGURE_SUFFIXES, "prepare": (".json",), "html": (".html", ".htm")}


def check_output_path(path: Path, kind: str) -> None:
    """Fail before any work if `path` cannot take a `kind` output: suffix, folder, permissions."""
    allowed = SUFFIXES[kind]
    if path.suffix.lower() not in allowed:
        raise AttnpipeError(
            f"unknown output type {path.suffix or '(none)'!r} for {path}: "
            f"this mode writes {' / '.join(allowed)}"
        )
    check_writable(path)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
