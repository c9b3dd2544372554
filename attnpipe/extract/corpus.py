"""Reading texts: from the command line, `.txt` (one per line), `.jsonl` (`id`, `text`),
`.csv` / `.tsv` (named columns). Every text gets a unique string id.

Ids: `--text` values are `text-0`, `text-1`, ...; `.txt` lines are `line-N` (N = 1-based line
number, blank lines are skipped); `.jsonl` rows use their `id` field (or `line-N` when absent);
`.csv`/`.tsv` rows use `--id-column` (or `row-N`, N = 1-based data row).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from attnpipe.errors import AttnpipeError

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")


@dataclass(frozen=True)
class Text:
    id: str
    text: str


def from_strings(texts: list[str]) -> list[Text]:
    """Texts given with --text, in order."""
    out = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise AttnpipeError(f"--text number {index + 1} is empty")
        out.append(Text(f"text-{index}", text))
    return out


def _decoded_lines(path: Path) -> list[str]:
    """The file's lines as text, with errors naming the file and line."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError as err:
        raise AttnpipeError(f"texts file not found: {path}") from err
    except IsADirectoryError as err:
        raise AttnpipeError(f"texts file is a folder: {path}") from err
    if b"\x00" in raw:
        line = raw[: raw.index(b"\x00")].count(b"\n") + 1
        raise AttnpipeError(f"{path} looks binary (NUL byte on line {line}); expected a text file")
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise AttnpipeError(
                f"{path} line {number} is not valid UTF-8 (byte {err.start + 1}); "
                "save the file as UTF-8"
            ) from err
    text = raw.decode("utf-8")
    if text.startswith("\ufeff"):  # a byte-order mark some editors write
        text = text[1:]
    # Split on "\n" only, like the UTF-8 check above: str.splitlines() would also break at
    # U+2028, form feeds and other separators that may sit inside a text or a JSON string.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_txt(path: Path) -> list[Text]:
    return [
        Text(f"line-{number}", line)
        for number, line in enumerate(_decoded_lines(path), start=1)
        if line.strip()
    ]


def jsonl_rows(path: Path) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 .jsonl file."""
    for number, line in enumerate(_decoded_lines(path), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as err:
            raise AttnpipeError(f"{path} line {number} is not valid JSON: {err.msg}") from err


def _read_jsonl(path: Path) -> list[Text]:
    out = []
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise AttnpipeError(f'{path} line {number} has no string "text" field')
        if not row["text"].strip():
            raise AttnpipeError(f"{path} line {number} has an empty text")
        text_id = row.get("id", f"line-{number}")
        out.append(Text(str(text_id), row["text"]))
    return out


def _read_table(path: Path, text_column: str, id_column: str | None) -> list[Text]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    reader = csv.DictReader(io.StringIO("\n".join(_decoded_lines(path))), delimiter=delimiter)
    columns = reader.fieldnames or []
    for flag, column in (("--text-column", text_column), ("--id-column", id_column)):
        if column is not None and column not in columns:
            raise AttnpipeError(
                f"{flag} {column!r} is not a column of {path}; columns: {', '.join(columns) or 'none'}"
            )
    out = []
    for number, row in enumerate(reader, start=1):
        text = row[text_column] or ""
        if not text.strip():
            raise AttnpipeError(f"{path} data row {number} has an empty {text_column!r}")
        out.append(Text(row[id_column] if id_column else f"row-{number}", text))
    return out


def read_texts_file(path: Path, text_column: str = "text", id_column: str | None = None) -> list[Text]:
    """Read a texts file by its suffix; refuse empty files and duplicate ids."""
    if path.suffix not in TEXT_SUFFIXES:
        raise AttnpipeError(
            f"unknown texts file type {path.suffix or '(none)'!r} for {path}; "
            f"use one of {', '.join(TEXT_SUFFIXES)}"
        )
    if path.suffix == ".txt":
        texts = _read_txt(path)
    elif path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    else:
        texts = _read_table(path, text_column, id_column)
    if not texts:
        raise AttnpipeError(f"texts file {path} has no texts")
    check_unique_ids(texts)
    return texts


def check_unique_ids(texts: list[Text]) -> None:
    seen: set[str] = set()
    for text in texts:
        if text.id in seen:
            raise AttnpipeError(f"text id {text.id!r} occurs more than once")
        seen.add(text.id)
