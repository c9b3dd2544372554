"""Seed 001's "backend" JSON: one text's attention arranged for a web frontend.

    {"tokens": [...], "text": "...",
     "layers": [{"layer_idx": 0, "heads": [{"head_idx": 0, "attention": [[...], ...]}, ...]}, ...]}

`layer_idx` / `head_idx` are model indices; `attention` is (query, key) over real tokens only
(padding removed). The published JSON Schema is docs/prepared.schema.json. Options keep the
file small enough for a browser: a subset of layers/heads, rounding, and a byte budget that
refuses (or, when asked, trims whole heads from the end) instead of writing a huge file.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store import TextAttention

DEFAULT_MAX_BYTES = 50_000_000  # ~50 MB: what a browser tab parses in a few seconds
# Seed 001's original tool kept padding in `tokens`; files without token ids come from it.
PAD_TOKENS = ("[PAD]", "<pad>")


@dataclass(frozen=True)
class Prepared:
    payload: dict
    num_bytes: int  # of `dumps(payload)`
    kept: tuple[tuple[int, int], ...]  # (layer_idx, head_idx) written
    dropped: tuple[tuple[int, int], ...]  # (layer_idx, head_idx) trimmed to fit the budget


def dumps(payload: dict) -> str:
    """The serialisation used for prepared files (compact, UTF-8, no NaN)."""
    return json.dumps(payload, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def real_token_count(item: TextAttention) -> int:
    """Tokens before trailing padding (only files of seed 001's tool, with no token ids, have any)."""
    n = item.num_tokens
    if np.all(item.token_ids < 0):
        while n and item.tokens[n - 1] in PAD_TOKENS:
            n -= 1
    return n


def _matrix(matrix: np.ndarray, decimals: int | None) -> list:
    # float32 -> Python float is exact, so an unrounded file reads back to the stored values.
    return (np.round(matrix.astype(np.float64), decimals) if decimals is not None else matrix).tolist()


def prepare(item: TextAttention, layer_ids: Sequence[int], head_ids: Sequence[int],
            layer_pos: Sequence[int], head_pos: Sequence[int], *, decimals: int | None = None,
            max_bytes: int | None = DEFAULT_MAX_BYTES, trim: bool = False) -> Prepared:
    """Build the prepared payload for stored layer/head positions `layer_pos` x `head_pos`.

    `layer_ids`/`head_ids` are the model indices of *all* stored layers/heads (file metadata).
    Over `max_bytes`: raise, or with `trim` keep the (layer, head) pairs in order while they fit.
    """
    if decimals is not None and not 0 <= decimals <= 10:
        raise AttnpipeError(f"--decimals {decimals} is out of range: use 0-10")
    n = real_token_count(item)
    envelope = {"tokens": list(item.tokens[:n]), "text": item.text, "layers": []}
    if item.generated is not None:  # generated text: which tokens the model wrote (the viewer marks them)
        envelope["generated"] = [bool(flag) for flag in item.generated[:n]]
    size = len(dumps(envelope).encode())
    pieces: list[tuple[int, int, list, int]] = []  # (layer_idx, head_idx, matrix, bytes)
    for lp in layer_pos:
        for hp in head_pos:
            rows = _matrix(item.attention[lp, hp, :n, :n], decimals)
            head = {"head_idx": head_ids[hp], "attention": rows}
            pieces.append((layer_ids[lp], head_ids[hp], rows, len(dumps(head).encode())))
    per_layer_overhead = len(dumps({"layer_idx": 0, "heads": []}).encode()) + 12  # + commas, idx digits
    total = size + sum(p[3] + 1 for p in pieces) + per_layer_overhead * len(layer_pos)
    kept = pieces
    if max_bytes is not None and total > max_bytes:
        if not trim:
            raise AttnpipeError(
                f"the prepared file would be about {total / 1e6:.1f} MB, over --max-bytes "
                f"{max_bytes} ({len(pieces)} heads of {n} x {n}): choose fewer --layers/--heads, "
                "round with --decimals, raise --max-bytes, or pass --trim to keep what fits"
            )
        kept, budget = [], max_bytes - size
        for piece in pieces:
            cost = piece[3] + 1 + per_layer_overhead
            if cost > budget:
                break
            kept.append(piece)
            budget -= cost
        if not kept:
            raise AttnpipeError(
                f"--max-bytes {max_bytes} cannot hold even one head of {n} x {n} tokens "
                f"(about {pieces[0][3]} bytes)"
            )
    layers: dict[int, list] = {}
    for layer_idx, head_idx, rows, _ in kept:
        layers.setdefault(layer_idx, []).append({"head_idx": head_idx, "attention": rows})
    payload = {**envelope, "layers": [{"layer_idx": k, "heads": v} for k, v in layers.items()]}
    return Prepared(
        payload=payload,
        num_bytes=len(dumps(payload).encode()),
        kept=tuple((p[0], p[1]) for p in kept),
        dropped=tuple((p[0], p[1]) for p in pieces[len(kept):]),
    )
