"""Choosing what to show from an attention file: a text, layers and heads by *model* index.

Files may store a subset of a model's layers and heads (`meta.layers`, `meta.heads` hold their
model indices). Users name model indices; negative values count from the end of what is stored.
"""

from __future__ import annotations

from attnpipe.errors import AttnpipeError
from attnpipe.store.format import TextAttention
from attnpipe.store.reader import AttentionFile


def describe(indices: tuple[int, ...]) -> str:
    """'0-5' for a contiguous run, '0, 3, 5' otherwise."""
    if indices and list(indices) == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}-{indices[-1]}" if len(indices) > 1 else str(indices[0])
    return ", ".join(map(str, indices))


def position(value: int, stored: tuple[int, ...], flag: str, what: str, source: object) -> int:
    """The position in the stored axis of model index `value` (negative: from the end)."""
    if value < 0 and -len(stored) <= value:
        return len(stored) + value
    if value >= 0 and value in stored:
        return stored.index(value)
    raise AttnpipeError(
        f"{flag} {value} is out of range: {source} stores {what} {describe(stored)}"
        f" (or -{len(stored)} to -1 from the end)"
    )


def positions(values: list[int] | None, stored: tuple[int, ...], flag: str, what: str,
              source: object) -> list[int]:
    """Positions of several model indices, in the order given; all of them for None."""
    if values is None:
        return list(range(len(stored)))
    return [position(v, stored, flag, what, source) for v in values]


def pick_text(attn: AttentionFile, text_id: str | None, index: int | None) -> TextAttention:
    """One text of a file, by id or by position (the first when neither is given)."""
    if text_id is not None and index is not None:
        raise AttnpipeError("give --text-id or --index, not both")
    if text_id is not None:
        if text_id not in attn.ids:
            shown = ", ".join(attn.ids[:5]) + (" ..." if len(attn.ids) > 5 else "")
            raise AttnpipeError(f"--text-id {text_id!r} is not in {attn.path} (ids: {shown})")
        return attn[text_id]
    index = 0 if index is None else index
    if not -len(attn) <= index < len(attn):
        raise AttnpipeError(
            f"--index {index} is out of range: {attn.path} has {len(attn)} text(s) (0-{len(attn) - 1})"
        )
    return attn[index]


def parse_index_list(text: str, flag: str) -> list[int]:
    """'0,2,-1' -> [0, 2, -1]."""
    try:
        return [int(part) for part in text.replace(" ", ",").split(",") if part]
    except ValueError as err:
        raise AttnpipeError(f"{flag} takes integers separated by commas, got {text!r}") from err
