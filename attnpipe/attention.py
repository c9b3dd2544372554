"""The one attention primitive every architecture calls.

Shapes use the fixed dimension names: B = batch, H = heads, Q = query positions,
K = key positions, D = head size. Scores are the logits before softmax; probabilities
(the attention we store) are after it.
"""

from __future__ import annotations

import torch


def padding_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Turn a (B, K) 1/0 mask of real/padded keys into an additive (B, 1, 1, K) mask.

    Padded keys get the dtype's most negative finite value (as transformers' eager path does),
    so after softmax they are exactly 0 and a row of real keys still sums to 1.
    """
    blocked = attention_mask[:, None, None, :] == 0  # (B, 1, 1, K)
    return torch.zeros(blocked.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        blocked, torch.finfo(dtype).min
    )


def attention_probs(
    q: torch.Tensor,  # (B, H, Q, D)
    k: torch.Tensor,  # (B, H, K, D)
    scale: float,
    mask: torch.Tensor | None = None,  # additive, broadcastable to (B, H, Q, K)
) -> torch.Tensor:
    """softmax(q·kᵀ · scale + mask) over the keys: (B, H, Q, K) probabilities."""
    # In place after the matmul: the same arithmetic with one (B, H, Q, K) buffer instead of three,
    # so long runs churn fewer large blocks through the allocator (peak RSS, bench_extract.py).
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale)  # (B, H, Q, K)
    if mask is not None:
        scores = scores.add_(mask)
    # At least float32 (as transformers upcasts fp16/bf16); float64 stays float64 (gradient checks).
    return torch.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)


def head_context(
    probs: torch.Tensor,  # (B, H, Q, K)
    v: torch.Tensor,  # (B, H, K, D)
    gates: torch.Tensor | None = None,  # (H,) or per text (B, H); None = no gating
) -> torch.Tensor:
    """Each head's context probs·v, (B, H, Q, D), multiplied by its gate (Michel et al. 2019)."""
    context = torch.matmul(probs, v)  # (B, H, Q, D)
    if gates is not None:  # one multiplier per head, applied before the heads are merged
        context = context * gates[..., None, None]
    return context


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, T, H·D) -> (B, H, T, D)."""
    b, t, _ = x.shape
    return x.view(b, t, num_heads, -1).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H·D)."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def causal_mask(
    length: int, dtype: torch.dtype, device: torch.device, window: int | None = None
) -> torch.Tensor:
    """Additive (1, 1, Q, K) mask: query i sees keys j <= i (and j > i - window with a sliding window).

    Blocked keys get the dtype's most negative value, so their probability is exactly 0.
    """
    q = torch.arange(length, device=device)[:, None]
    k = torch.arange(length, device=device)[None, :]
    blocked = k > q
    if window is not None:
        blocked |= k <= q - window  # transformers' sliding_window_overlay: kv_idx > q_idx - window
    return torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill(
        blocked, torch.finfo(dtype).min
    )[None, None]
