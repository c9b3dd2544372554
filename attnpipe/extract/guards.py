"""Runtime guards: every batch's attention is checked before it is written.

After a family's forward pass, each kept layer's (B, H, Q, K) probabilities must, on the real
query rows of every text:
- be finite (no NaN, no ±Inf) and the batch must not be empty;
- sum to 1 over the keys within `ROW_SUM_TOL`;
- give exactly 0 to padded keys (the padding mask's fill value makes them exactly 0);
- give exactly 0 to future keys (key > query) in a causal family.

A violation stops the run with an AttnpipeError naming the text id, layer and head (the
output is never written: extraction writes atomically). The check is a few element-wise passes
over tensors the forward pass already made, always on: on MiniLM and the demo corpus it costs
1.4 % of the forward pass (bench/bench_guards.py, 1 thread). Sliding-window limits are not checked
here; the parity tests cover them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from attnpipe import faults
from attnpipe.errors import AttnpipeError

# A float32 softmax row of n <= a few thousand terms sums to 1 within ~n·6e-8 (measured ~1e-7 on
# MiniLM); 1e-4 leaves room for long inputs and still catches a wrong scale, mask or a dropped key.
ROW_SUM_TOL = 1e-4
# Families whose queries see only earlier keys (their forward passes add attention.causal_mask).
from attnpipe.models import CAUSAL_MODEL_TYPES  # noqa: E402  (derived from the families' CAUSAL)


def is_causal(model_type: str) -> bool:
    return model_type in CAUSAL_MODEL_TYPES


def _where(bad: torch.Tensor, text_ids: Sequence[str], layer: int) -> str:
    """"text 'x' layer 2 head 5 query 3" for the first True element of a (B, H, Q) mask."""
    row, head, query = (int(v) for v in bad.nonzero()[0])
    return f"text {text_ids[row]!r} layer {layer} head {head} query {query}"


def check_attention(
    attentions: Mapping[int, torch.Tensor],  # layer -> (B, H, Q, K) probabilities
    lengths: Sequence[int],  # real tokens of each batch row (right padding)
    text_ids: Sequence[str],  # id of each batch row, for the message
    causal: bool,
    tol: float = ROW_SUM_TOL,
) -> None:
    """Raise AttnpipeError at the first violation of the contract above; return None if all hold."""
    faults.point("batch")
    if not attentions:
        raise AttnpipeError(f"the forward pass returned no attention for texts {list(text_ids)[:5]}")
    first = next(iter(attentions.values()))
    b, _, t, _ = first.shape
    if b != len(lengths) or b == 0 or t == 0 or min(lengths) < 1:
        raise AttnpipeError(
            f"empty attention {tuple(first.shape)} for texts {list(text_ids)[:5]} (lengths {list(lengths)[:5]})"
        )
    device = first.device
    real = torch.arange(t, device=device)[None, :] < torch.as_tensor(list(lengths), device=device)[:, None]
    real_rows = real[:, None, :]  # (B, 1, Q): the query rows that are stored
    for layer, probs in attentions.items():
        if probs.shape[0] != b or probs.shape[-2:] != (t, t) or probs.shape[1] == 0:
            raise AttnpipeError(f"layer {layer} attention has shape {tuple(probs.shape)}: expected ({b}, H, {t}, {t})")
        # One pass: a row sum is finite only if every weight in the row is (NaN/Inf propagate).
        sums = probs.sum(dim=-1, dtype=torch.float32)  # (B, H, Q)
        broken = ~torch.isfinite(sums) & real_rows
        if bool(broken.any()):
            raise AttnpipeError(
                f"attention is NaN or infinite at {_where(broken, text_ids, layer)}: the forward pass is broken"
            )
        off = ((sums - 1).abs() > tol) & real_rows
        if bool(off.any()):
            worst = float((sums - 1).abs()[off].max())
            raise AttnpipeError(
                f"attention rows do not sum to 1 at {_where(off, text_ids, layer)}: off by up to "
                f"{worst:.3g} (tolerance {tol:g})"
            )
        # Padded keys of real rows: after length-sorted batching a thin slice per text.
        for row, n in enumerate(lengths):
            padded = probs[row, :, :n, n:] != 0  # (H, n, T - n)
            if n < t and bool(padded.any()):
                head, query, key = (int(v) for v in padded.nonzero()[0])
                raise AttnpipeError(
                    f"a padded key gets non-zero attention at text {text_ids[row]!r} layer {layer} "
                    f"head {head} query {query} key {n + key}: the padding mask is broken"
                )
        if causal:  # keys after the query, in real rows
            future = (torch.triu(probs, diagonal=1) != 0).any(dim=-1) & real_rows  # (B, H, Q)
            if bool(future.any()):
                row, head, query = (int(v) for v in future.nonzero()[0])
                key = int((probs[row, head, query, query + 1:] != 0).nonzero()[0]) + query + 1
                raise AttnpipeError(
                    f"a future key gets non-zero attention at text {text_ids[row]!r} layer {layer} "
                    f"head {head} query {query} key {key}: the causal mask is broken"
                )
