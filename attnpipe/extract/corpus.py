"""The one corpus reader: texts and source/target pairs from the command line or from a file.

Used by the CLI (`extract_attention.py --text / --texts-file / --source --target`), the workflow
(the Snakefile counts and shards a corpus with it, `scripts/split_corpus.py` writes the shards
with it) and the Python API, so a text has the same id whoever reads the corpus.

Files: `.txt` (one text per line), `.jsonl` (one JSON object per line: `text`, optional `id`;
pairs: `source`, `target`, optional `id`; without `target` in every row the model generates the
targets), `.csv` / `.tsv` (named columns). Files must be UTF-8;
only "\\n" (or "\\r\\n") ends a line, so U+2028, form feeds and the like stay inside a text.
Blank lines are skipped. A NUL byte or invalid UTF-8 is refused with the file and line. Problems
of single rows (an empty text, a line that is not JSON or has no "text", a repeated id) are all
collected and refused in one error listing the first 20 with their line numbers in the user's
file, and how many there are; `skip_empty=True` (`--skip-empty`, the workflow's `skip_empty`)
skips empty texts instead, and `read_corpus` says which lines it skipped.

Ids (one scheme everywhere):

| input                       | id                                                     |
| --------------------------- | ------------------------------------------------------ |
| `--text` (given in order)   | `text-0`, `text-1`, ... (0-based)                      |
| `--source` / `--target`     | `pair-0`, `pair-1`, ... (0-based)                      |
| `.txt` line                 | `line-N`, N = 1-based line number in the file          |
| `.jsonl` row                | its `id` field (as a string), else `line-N` as above   |
| `.csv` / `.tsv` row         | the `--id-column` value, else `row-N` (1-based data row)|

A line number counts every line of the file, blank ones too, so an id says where its text is and
does not change when texts are appended or when the workflow splits the corpus into shards (a
shard is a `.jsonl` file whose rows carry these ids). Ids must be unique within a file.

Until this reader was shared, the workflow named id-less texts `{corpus}-{i:06d}` (i = 0-based
line index, or data row for .csv): that id is now `line-{i+1}` (`row-{i+1}` for .csv/.tsv).

    from attnpipe.extract.corpus import read_texts_file
    texts = read_texts_file(Path("data/demo_corpus.jsonl"))   # [Text(id, text), ...]
"""

from __future__ import annotations

import csv
import os
import stat
import hashlib
import io
import json
from collections import Counter
from collections.abc import Iterator, Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import atomic_path

TEXT_SUFFIXES = (".txt", ".jsonl", ".csv", ".tsv")
EXTRA_CELLS = "\x00extra"  # DictReader's key for cells beyond the header (no column can be named so)
MAX_PROBLEMS_SHOWN = 20  # rows named in one corpus error; the count says how many there are


@dataclass(frozen=True)
class Text:
    id: str
    text: str
    line: int | None = dataclasses.field(default=None, compare=False, repr=False)  # 1-based line in its file


@dataclass(frozen=True)
class Corpus:
    """A texts file as read: its texts, and the lines of the empty texts skipped (skip_empty)."""

    texts: tuple[Text, ...]
    skipped_empty: tuple[int, ...] = ()


class Problems:
    """Row problems of one corpus file, collected so that one error names them all."""

    def __init__(self, path: Path):
        self.path = path
        self.items: list[tuple[int, str]] = []  # (line, what is wrong: "has an empty text", ...)
        self.empty = 0

    def add(self, line: int, what: str, empty: bool = False) -> None:
        self.items.append((line, what))
        self.empty += empty

    def raise_if_any(self) -> None:
        if not self.items:
            return
        if len(self.items) == 1:
            line, what = self.items[0]
            message = f"{self.path} line {line} {what}"
        else:
            items = sorted(self.items)
            shown = "; ".join(f"line {line} {what}" for line, what in items[:MAX_PROBLEMS_SHOWN])
            more = (f" (the first {MAX_PROBLEMS_SHOWN} of {len(items)} shown)"
                    if len(items) > MAX_PROBLEMS_SHOWN else "")
            message = f"{self.path} has {len(items)} problems{more}: {shown}"
        if self.empty:
            message += " (--skip-empty, or skip_empty: true in a workflow corpus, skips empty texts)"
        raise AttnpipeError(message)


@dataclass(frozen=True)
class Pair:
    id: str
    source: str
    target: str | None  # None: the encoder-decoder generates it (attnpipe/extract/generate.py)


# ----------------------------------------------------------------------------- command line


def check_characters(flag: str, number: int, text: str) -> None:
    """A command-line text holds characters only: bytes of argv that are not UTF-8 reach Python as
    lone surrogates (surrogateescape, '\\udcff' for byte 0xff), which no tokenizer or file can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise AttnpipeError(f"{flag} number {number} holds {err.object[err.start:err.end]!a}, a lone surrogate "
                            "(a byte that is not UTF-8 in the command line?): give the text in UTF-8") from None


def from_strings(texts: list[str]) -> list[Text]:
    """Texts given with --text, in order."""
    out = []
    for index, text in enumerate(texts):
        if not text.strip():
            raise AttnpipeError(f"--text number {index + 1} is empty")
        check_characters("--text", index + 1, text)
        out.append(Text(f"text-{index}", text))
    return out


def pairs_from_strings(sources: list[str], targets: list[str]) -> list[Pair]:
    """--source / --target given on the command line, paired in order: ids pair-0, pair-1, ...

    No --target at all: pairs whose targets the model generates (target None)."""
    if not targets:
        for index, source in enumerate(sources):
            if not source.strip():
                raise AttnpipeError(f"--source number {index + 1} is empty")
            check_characters("--source", index + 1, source)
        return [Pair(f"pair-{index}", source, None) for index, source in enumerate(sources)]
    if len(sources) != len(targets):
        raise AttnpipeError(
            f"--source was given {len(sources)} time(s) and --target {len(targets)} time(s): "
            "give one --target for each --source, in the same order"
        )
    pairs = []
    for index, (source, target) in enumerate(zip(sources, targets)):
        for flag, text in (("--source", source), ("--target", target)):
            if not text.strip():
                raise AttnpipeError(f"{flag} number {index + 1} is empty")
            check_characters(flag, index + 1, text)
        pairs.append(Pair(f"pair-{index}", source, target))
    return pairs


# ----------------------------------------------------------------------------- files


def check_regular_file(path: Path, what: str) -> None:
    """Refuse a FIFO, device or socket before opening it: reading one may wait forever."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return  # said by the reader, with the file's role
    except OSError as err:
        raise AttnpipeError(f"cannot read {what} {path}: {err.strerror}") from err
    if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
        raise AttnpipeError(f"{what} {path} is not a regular file (a FIFO, device or socket): "
                            "give a file on disk")


def decoded_lines(path: Path) -> list[str]:
    """The file's lines as text, with errors naming the file and line."""
    check_regular_file(path, "texts file")
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


def _read_txt(path: Path, problems: Problems) -> list[tuple[Text, bool]]:
    return [
        (Text(f"line-{number}", line, number), False)
        for number, line in enumerate(decoded_lines(path), start=1)
        if line.strip()
    ]


def jsonl_rows(path: Path, problems: Problems | None = None) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) for each non-blank line of a UTF-8 .jsonl file. A line that is
    not JSON is refused at once, or, given `problems`, noted there and left out."""
    for number, line in enumerate(decoded_lines(path), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            problem = f"is not valid JSON: {err.msg}"
        except (RecursionError, ValueError) as err:  # nesting too deep; an integer over 4300 digits
            problem = f"is JSON nested too deeply or with too large a number: {type(err).__name__}"
        else:
            try:
                json.dumps(row, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as err:  # "\ud800" escapes parse to strings no file can hold
                problem = (f"holds a lone surrogate ({err.object[err.start:err.end]!a}): not a character; "
                           "fix the text")
            else:
                yield number, row
                continue
        if problems is None:
            raise AttnpipeError(f"{path} line {number} {problem}")
        problems.add(number, problem)


def _read_jsonl(path: Path, problems: Problems) -> list[tuple[Text, bool]]:
    out = []
    for number, row in jsonl_rows(path, problems):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            problems.add(number, 'has no string "text" field')
            continue
        text_id = row.get("id", f"line-{number}")
        if isinstance(text_id, bool) or not isinstance(text_id, (str, int)):  # null, NaN, objects
            problems.add(number, f'has an "id" that is not a string or an integer: {json.dumps(text_id)[:40]}')
            continue
        out.append((Text(str(text_id), row["text"], number), not row["text"].strip()))
    return out


def _read_table(path: Path, problems: Problems, text_column: str, id_column: str | None) -> list[tuple[Text, bool]]:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    # strict: an unterminated quote is an error, not the rest of the file swallowed into one text
    reader = csv.DictReader(io.StringIO("\n".join(decoded_lines(path))), delimiter=delimiter, strict=True,
                            restkey=EXTRA_CELLS)
    kind = path.suffix[1:].upper()
    try:
        columns = reader.fieldnames or []
    except csv.Error as err:
        raise AttnpipeError(f"{path} line 1 is not valid {kind}: {err} (an unterminated quote?)") from err
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise AttnpipeError(f"{path} names the column(s) {', '.join(map(repr, repeated))} more than once")
    for flag, column in (("--text-column", text_column), ("--id-column", id_column)):
        if column is not None and column not in columns:
            raise AttnpipeError(
                f"{flag} {column!r} is not a column of {path}; columns: {', '.join(columns) or 'none'}"
            )
    out = []
    end = reader.line_num  # the header's last line; a row starts on the line after the previous one
    try:
        for number, row in enumerate(reader, start=1):
            line, end = end + 1, reader.line_num  # a quoted field may span lines: the row's first line
            if EXTRA_CELLS in row:
                problems.add(line, f"has {len(columns) + len(row[EXTRA_CELLS])} cells for {len(columns)} columns")
                continue
            text = row[text_column] or ""
            text_id = row[id_column] if id_column else f"row-{number}"
            out.append((Text(text_id, text, line), not text.strip()))
    except csv.Error as err:
        raise AttnpipeError(f"{path} line {end + 1} is not valid {kind}: {err} (an unterminated quote?)") from err
    return out


def read_corpus(path: Path, text_column: str = "text", id_column: str | None = None, *,
                skip_empty: bool = False) -> Corpus:
    """Read a texts file by its suffix. Every row problem (empty texts unless `skip_empty`, rows
    without a text, lines that are not JSON, repeated ids) is refused in one error that names
    them by line; a file with no texts is refused too."""
    if path.suffix not in TEXT_SUFFIXES:
        if path.is_dir():
            raise AttnpipeError(f"texts file is a folder: {path}; give a file ending in {', '.join(TEXT_SUFFIXES)}")
        raise AttnpipeError(f"unknown texts file type {path.suffix or '(none)'!r} for {path}; "
                            f"use one of {', '.join(TEXT_SUFFIXES)}")
    problems = Problems(path)
    if path.suffix == ".txt":
        rows = _read_txt(path, problems)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path, problems)
    else:
        rows = _read_table(path, problems, text_column, id_column)
    table = path.suffix in (".csv", ".tsv")
    texts, skipped = [], []
    for text, empty in rows:
        if not empty:
            texts.append(text)
        elif skip_empty:
            skipped.append(text.line)
        else:
            problems.add(text.line, f"has an empty text{f' in column {text_column!r}' if table else ''}", empty=True)
    first: dict[str, int] = {}
    for text in texts:
        if text.id in first:
            problems.add(text.line, f"repeats text id {text.id!r} (first on line {first[text.id]})")
        else:
            first[text.id] = text.line
    problems.raise_if_any()
    if not texts:
        raise AttnpipeError(f"texts file {path} has no texts"
                            + (f" ({len(skipped)} empty text(s) skipped)" if skipped else ""))
    return Corpus(tuple(texts), tuple(skipped))


def read_texts(path: Path, text_column: str = "text", id_column: str | None = None) -> list[Text]:
    """The texts of a texts file (`read_corpus`: every problem refused at once, ids unique)."""
    return list(read_corpus(path, text_column, id_column).texts)


def read_texts_file(path: Path, text_column: str = "text", id_column: str | None = None) -> list[Text]:
    """Read a texts file by its suffix; refuse empty files, empty texts and duplicate ids."""
    return read_texts(path, text_column, id_column)


def duplicate_ids(items: Sequence[Text | Pair]) -> list[str]:
    """Ids that occur more than once, sorted (one pass: corpora can be large)."""
    return sorted(i for i, count in Counter(item.id for item in items).items() if count > 1)


def check_unique_ids(items: Sequence[Text | Pair]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise AttnpipeError(f"text id {item.id!r} occurs more than once")
        seen.add(item.id)


# ----------------------------------------------------------------------------- pairs files


def _first_row(path: Path) -> object:
    for line in decoded_lines(path):
        if line.strip():
            try:
                return json.loads(line)
            except (json.JSONDecodeError, RecursionError, ValueError):  # said by the texts reader
                return None
    return None


def is_pairs_file(path: Path) -> bool:
    """A .jsonl file whose first row has a "source" field: a file of source/target pairs."""
    if path.suffix != ".jsonl" or not path.is_file():
        return False
    row = _first_row(path)
    return isinstance(row, dict) and "source" in row


def read_pairs_file(path: Path) -> list[Pair]:
    """A .jsonl file of {"source": ..., "target": ..., "id": optional}; ids default to line-N.

    Rows without "target" (all of them, or none) are sources whose targets the model generates."""
    pairs = []
    with_target = None  # whether the first row has a target: every row must then agree
    for number, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise AttnpipeError(f"{path} line {number} is not a JSON object")
        if with_target is None:
            with_target, first_line = "target" in row, number
        fields = ("source", "target") if with_target else ("source",)
        if not with_target and "target" in row:
            raise AttnpipeError(f'{path} line {number} has a "target" field but line {first_line} has none: '
                                "give every pair a target, or none (the model then generates them)")
        for field in fields:
            if not isinstance(row.get(field), str):
                raise AttnpipeError(f'{path} line {number} has no string "{field}" field')
            if not row[field].strip():
                raise AttnpipeError(f'{path} line {number} has an empty "{field}"')
        pair_id = row.get("id", f"line-{number}")
        if isinstance(pair_id, bool) or not isinstance(pair_id, (str, int)):  # null, NaN, objects: as for texts
            raise AttnpipeError(f'{path} line {number} has an "id" that is not a string or an integer: '
                                f"{json.dumps(pair_id)[:40]}")
        pairs.append(Pair(str(pair_id), row["source"], row.get("target")))
    if not pairs:
        raise AttnpipeError(f"texts file {path} has no pairs")
    check_unique_ids(pairs)
    return pairs


# ----------------------------------------------------------------------------- shards (the workflow)


def num_shards(num_texts: int, shard_size: int) -> int:
    if shard_size < 1:
        raise AttnpipeError(f"the shard size must be at least 1, got {shard_size}")
    return (num_texts + shard_size - 1) // shard_size


def shard(texts: Sequence[Text], shard_size: int, index: int) -> list[Text]:
    """Texts [index * shard_size, (index + 1) * shard_size), in file order."""
    count = num_shards(len(texts), shard_size)
    if not 0 <= index < count:
        raise AttnpipeError(f"shard {index} does not exist: {len(texts)} texts make shards 0..{count - 1}")
    return list(texts[index * shard_size:(index + 1) * shard_size])


def shard_digest(texts: Sequence[Text]) -> str:
    """16 hex digits naming a shard's ids and texts: the workflow redoes a shard when it changes.

    The same digest the workflow has always computed (sha256 of the JSON list of {"id", "text"}),
    so a result folder whose corpus gives the same ids keeps its shards."""
    rows = [{"id": t.id, "text": t.text} for t in texts]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def write_jsonl(path: Path, texts: Sequence[Text]) -> None:
    """A .jsonl corpus of {"id", "text"} rows, complete or absent; read back with the same ids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps({"id": t.id, "text": t.text}, ensure_ascii=False) + "\n" for t in texts)
    with atomic_path(path) as tmp:
        tmp.write_text(lines, encoding="utf-8")
