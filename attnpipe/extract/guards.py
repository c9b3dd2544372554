"""Runtime guards: every batch's attention is checked before it is written.

After a family's forward pass, each kept layer's (B, H, Q, K) probabilities of every attention
kind (self, decoder, cross) must, on the real query rows of every text:
- be finite (no NaN, no ±Inf) and the batch must not be empty;
- sum to 1 over the keys within `ROW_SUM_TOL`;
- give exactly 0 to padded keys (the padding mask's fill value makes them exactly 0);
- give exactly 0 to future keys (key > query) in a causal family (and in a decoder's self-attention).

Cross-attention has other query lengths (target) than key lengths (source): `key_lengths`.

A violation stops the run with an AttnpipeError naming the text id, layer and head (the
output is never written: extraction writes atomically). The check is a few element-wise passes
over tensors the forward pass already made, always on: on MiniLM and the demo corpus it costs
1.4 % of the forward pass (bench/bench_guards.py, 1 thread). Sliding-window limits are not checked
here; the parity tests cover them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import torch

from attnpipe import faults
from attnpipe.errors import AttnpipeError
from attnpipe.models import CAUSAL_MODEL_TYPES

# A float32 softmax row of n <= a few thousand terms sums to 1 within ~n·6e-8 (measured ~1e-7 on
# MiniLM); 1e-4 leaves room for long inputs and still catches a wrong scale, mask or a dropped key.
ROW_SUM_TOL = 1e-4
def is_causal(model_type: str) -> bool:
    """Whether a model type's (self-)attention is causal: its family's CAUSAL constant."""
    return model_type in CAUSAL_MODEL_TYPES


# How a message names each attention kind: "text 'x' cross-attention layer 2 head 5 ...".
KIND_NAMES = {"self": "", "decoder": "decoder self-attention ", "cross": "cross-attention "}


def _where(bad: torch.Tensor, text_ids: Sequence[str], layer: int, kind: str = "self") -> str:
    """"text 'x' layer 2 head 5 query 3" for the first True element of a (B, H, Q) mask."""
    row, head, query = (int(v) for v in bad.nonzero()[0])
    return f"text {text_ids[row]!r} {KIND_NAMES[kind]}layer {layer} head {head} query {query}"


def check_attention(
    attentions: Mapping[int, torch.Tensor],  # layer -> (B, H, Q, K) probabilities
    lengths: Sequence[int],  # real tokens of each batch row (right padding)
    text_ids: Sequence[str],  # id of each batch row, for the message
    causal: bool,
    tol: float = ROW_SUM_TOL,
    key_lengths: Sequence[int] | None = None,  # real keys of each row when they differ (cross-attention)
    kind: str = "self",  # named in the messages (see KIND_NAMES)
) -> None:
    """Raise AttnpipeError at the first violation of the contract above; return None if all hold."""
    faults.point("batch")
    if not attentions:
        raise AttnpipeError(f"the forward pass returned no attention for texts {list(text_ids)[:5]}")
    key_lengths = lengths if key_lengths is None else key_lengths
    first = next(iter(attentions.values()))
    b, _, t, s = first.shape
    if b != len(lengths) or b == 0 or t == 0 or s == 0 or min(lengths) < 1 or min(key_lengths) < 1:
        raise AttnpipeError(
            f"empty attention {tuple(first.shape)} for texts {list(text_ids)[:5]} (lengths {list(lengths)[:5]})"
        )
    if key_lengths is lengths and s != t:
        raise AttnpipeError(f"layer {next(iter(attentions))} attention has shape {tuple(first.shape)}: "
                            f"expected ({b}, H, {t}, {t})")
    real_rows, shortest, padded_keys = _batch_masks(tuple(lengths), tuple(key_lengths), t, s, first.device,
                                                    torch.is_inference_mode_enabled())
    name = KIND_NAMES[kind]
    for layer, probs in attentions.items():
        if probs.shape[0] != b or probs.shape[-2:] != (t, s) or probs.shape[1] == 0:
            raise AttnpipeError(f"{name}layer {layer} attention has shape {tuple(probs.shape)}: "
                                f"expected ({b}, H, {t}, {s})")
        # One pass: a row sum is finite only if every weight in the row is (NaN/Inf propagate),
        # and a NaN or infinite sum fails the comparison too; the kind of failure is told apart
        # only when there is one.
        sums = _row_sums(probs.detach())  # (B, H, Q)
        off = ~((sums - 1).abs() <= tol) & real_rows
        if bool(off.any()):
            broken = ~torch.isfinite(sums) & real_rows
            if bool(broken.any()):
                raise AttnpipeError(
                    f"attention is NaN or infinite at {_where(broken, text_ids, layer, kind)}: the forward pass is broken"
                )
            worst = float((sums - 1).abs()[off].max())
            raise AttnpipeError(
                f"attention rows do not sum to 1 at {_where(off, text_ids, layer, kind)}: off by up to "
                f"{worst:.3g} (tolerance {tol:g})"
            )
        # Padded keys of real rows: after length-sorted batching a thin slice of keys, checked for
        # the whole batch at once; the rows are then visited only to name the first offender.
        if padded_keys is not None and bool(
                ((probs[..., shortest:] != 0) & padded_keys[:, None, None, :]).any(dim=-1).logical_and_(real_rows).any()):
            _padded_key_error(probs, lengths, key_lengths, text_ids, layer, name)
        if causal:  # keys after the query, in real rows
            future = (torch.triu(probs, diagonal=1) != 0).any(dim=-1) & real_rows  # (B, H, Q)
            if bool(future.any()):
                row, head, query = (int(v) for v in future.nonzero()[0])
                key = int((probs[row, head, query, query + 1:] != 0).nonzero()[0]) + query + 1
                raise AttnpipeError(
                    f"a future key gets non-zero attention at text {text_ids[row]!r} {name}layer {layer} "
                    f"head {head} query {query} key {key}: the causal mask is broken"
                )


@functools.lru_cache(maxsize=8)
def _batch_masks(lengths: tuple[int, ...], key_lengths: tuple[int, ...], t: int, s: int, device: torch.device,
                 inference: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """A batch's masks, made once for all its layers (the runner checks a layer at a time): the
    (B, 1, Q) query rows that are stored, the shortest row's key count, and (B, S - shortest)
    which keys from there on are padding (None when no row has padded keys). `inference` keeps
    tensors made in inference mode apart from the others (a gradient run's)."""
    real = torch.arange(t, device=device)[None, :] < torch.as_tensor(lengths, device=device)[:, None]
    shortest = min(key_lengths)
    padded_keys = None
    if shortest < s:
        padded_keys = (torch.arange(shortest, s, device=device)[None, :]
                       >= torch.as_tensor(key_lengths, device=device)[:, None])
    return real[:, None, :], shortest, padded_keys


def _row_sums(probs: torch.Tensor) -> torch.Tensor:
    """(B, H, Q, K) -> (B, H, Q) float32 sums over keys. Float32 on the CPU: a product with ones
    (BLAS's dot products; a reduction over a short last axis is several times slower in torch)."""
    if probs.dtype == torch.float32 and probs.device.type == "cpu":
        return torch.matmul(probs, torch.ones(probs.shape[-1], dtype=torch.float32))
    return probs.sum(dim=-1, dtype=torch.float32)


def _padded_key_error(probs: torch.Tensor, lengths: Sequence[int], key_lengths: Sequence[int],
                      text_ids: Sequence[str], layer: int, name: str) -> None:
    """Raise the error for the first real row (in batch order) that gives a padded key weight."""
    s = probs.shape[-1]
    for row, (n, k) in enumerate(zip(lengths, key_lengths, strict=True)):
        padded = probs[row, :, :n, k:] != 0  # (H, n, S - k)
        if k < s and bool(padded.any()):
            head, query, key = (int(v) for v in padded.nonzero()[0])
            raise AttnpipeError(
                f"a padded key gets non-zero attention at text {text_ids[row]!r} {name}layer {layer} "
                f"head {head} query {query} key {k + key}: the padding mask is broken"
            )
