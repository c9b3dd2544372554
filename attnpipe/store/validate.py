"""Checks on what is read and written: versions, provenance, shapes, rows that are probabilities.

Each failure is one AttnpipeError naming the file, the text and, for attention, layer and head.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store.format import (READABLE_VERSIONS, ROW_SUM_TOL, UINT8_ROW_SLACK, Provenance,
                                   TextAttention)


def check_version(path: Path, version: int) -> None:
    if version not in READABLE_VERSIONS:
        raise AttnpipeError(
            f"{path} has attention schema version {version}; this attnpipe reads version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}"
        )


def check_meta(path: Path, meta: Provenance) -> None:
    if meta.dtype not in ROW_SUM_TOL:
        raise AttnpipeError(f"{path}: unknown storage dtype {meta.dtype!r} (expected {', '.join(ROW_SUM_TOL)})")
    if not meta.layers or not meta.heads:
        raise AttnpipeError(f"{path} stores no layers or no heads")


def check_rows(path: Path, text_id: str, attention: np.ndarray, layers, heads, dtype: str) -> None:
    """Every stored row must be finite, non-negative and sum to 1 within ROW_SUM_TOL[dtype].

    attention: (L, H, n, n) with `layers`/`heads` its model indices, used in the message.
    """
    tol = ROW_SUM_TOL.get(dtype, ROW_SUM_TOL["float32"])
    if dtype == "uint8":  # each of the row's keys is rounded by at most 0.5/255
        tol += attention.shape[-1] * UINT8_ROW_SLACK

    def where(bad: np.ndarray) -> str:
        layer, head, query = (int(v) for v in np.argwhere(bad)[0][:3])
        return f"text {text_id!r} layer {layers[layer]} head {heads[head]} query {query}"

    # Two passes over the data: row sums (NaN/Inf propagate into them) and the minimum.
    sums = attention.sum(axis=-1)  # (L, H, n); numpy's pairwise float32 sum errs ~1e-7, far below tol
    finite = np.isfinite(sums)
    if not finite.all():
        raise AttnpipeError(f"{path}: attention is NaN or infinite at {where(~finite)}")
    if attention.size and attention.min() < 0:
        raise AttnpipeError(f"{path}: attention is negative at {where((attention < 0).any(axis=-1))}")
    off = np.abs(sums.astype(np.float64) - 1.0)  # (L, H, n)
    if (off > tol).any():
        raise AttnpipeError(
            f"{path}: attention rows do not sum to 1 at {where(off > tol)} (off by {off.max():.3g}, "
            f"tolerance {tol:g} for {dtype}): not probabilities"
        )


def check_text(path: Path, item: TextAttention, meta: Provenance) -> None:
    """A text read back must be consistent: shapes agree with its tokens and the stored layers/heads."""
    n = item.num_tokens
    shape = item.attention.shape
    rows = n if item.query_positions is None else len(item.query_positions)  # --rows cls|last: 1
    expected = (len(meta.layers), len(meta.heads), rows, n)
    if shape != expected:
        raise AttnpipeError(
            f"{path}: text {item.id!r} has attention of shape {shape}; expected {expected} "
            "(stored layers x stored heads x query rows x tokens)"
        )
    for name in ("token_ids", "special_tokens_mask", "word_ids"):
        if len(getattr(item, name)) != n:
            raise AttnpipeError(f"{path}: text {item.id!r} has {len(getattr(item, name))} {name} for {n} tokens")
    check_rows(path, item.id, item.attention, meta.layers, meta.heads, meta.dtype)
    if item.target is not None:  # encoder-decoder: the decoder's and the cross-attention's rows too
        for attention in (item.target.decoder_attention, item.target.cross_attention):
            check_rows(path, item.id, attention, meta.decoder_layers, meta.decoder_heads, meta.dtype)
    check_gradient_shapes(path, item, meta)


def gradient_shape_errors(item: TextAttention, meta: Provenance | None = None) -> list[str]:
    """--explain fields, where present: each attention gradient has its attention's shape,
    gradient x input one value per token and, given the file's provenance, each head score one
    value per model head of its kind. Returns one message per field that does not fit."""
    checks = [("attention_grad", item.attention_grad, item.attention.shape),
              ("token_grad_input", item.token_grad_input, (item.num_tokens,))]
    layers = item.attention.shape[:1]
    checks += [("attention_attribution", item.attention_attribution, item.attention.shape),  # --attribution ig
               ("attribution_gap", item.attribution_gap, layers), ("attribution_delta", item.attribution_delta, layers)]
    target = item.target
    if target is not None:
        checks += [("decoder_attention_grad", target.decoder_attention_grad, target.decoder_attention.shape),
                   ("cross_attention_grad", target.cross_attention_grad, target.cross_attention.shape)]
        for kind in ("decoder", "cross"):
            attention = getattr(target, f"{kind}_attention")
            checks += [(f"{kind}_attention_attribution", getattr(target, f"{kind}_attention_attribution"),
                        attention.shape)]
            checks += [(f"{kind}_attribution_{what}", getattr(target, f"{kind}_attribution_{what}"),
                        attention.shape[:1]) for what in ("gap", "delta")]
    if meta is not None:
        heads = (meta.num_layers, meta.num_heads)
        checks += [("head_gate_grad", item.head_gate_grad, heads), ("head_ablation", item.head_ablation, heads)]
        if target is not None:
            decoder_heads = (meta.decoder_num_layers, meta.decoder_num_heads)
            checks += [(f"{kind}_head_{score}", getattr(target, f"{kind}_head_{score}"), decoder_heads)
                       for kind in ("decoder", "cross") for score in ("gate_grad", "ablation")]
    return [f"text {item.id!r} has {name} of shape {array.shape}; expected {tuple(shape)}"
            for name, array, shape in checks if array is not None and array.shape != tuple(shape)]


def check_gradient_shapes(path: Path, item: TextAttention, meta: Provenance | None = None) -> None:
    """Refuse an item whose --explain fields do not fit its attention (gradient_shape_errors):
    on read (`path` is the file) and before a writer stores it (no meta yet)."""
    errors = gradient_shape_errors(item, meta)
    if errors:
        raise AttnpipeError(f"{path}: {errors[0]}")


def check_no_nul(item: TextAttention) -> None:
    """HDF5 variable-length strings end at NUL, so a NUL would be cut silently: refuse it."""
    for what, value in (("id", item.id), ("text", item.text), *(("token", t) for t in item.tokens)):
        if "\x00" in value:
            raise AttnpipeError(
                f"text {item.id!r}: its {what} contains a NUL character (U+0000), which HDF5 strings "
                "cannot hold; remove it, or write one text to .json, which keeps it"
            )


def error_reason(err: Exception) -> str:
    """An exception as a short single-line reason for an error message."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:200]}" if isinstance(err, KeyError) else text[:200] or type(err).__name__
