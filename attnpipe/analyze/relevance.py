"""Gradient-based relevance on stored attention and its gradients (files written with --explain).

Pure numpy on arrays, like rollout.py; the gradients come from the extraction stage
(attnpipe/extract/gradients.py), so no model is loaded here.

Gradient-weighted attention (seed 004's "gradient-weighted attention", written there for its
"attention flow" section as A ⊙ |∇V|; the issue and this module use the gradient with respect
to the attention itself)::

    G[l, h] = A[l, h] ⊙ |∂target/∂A[l, h]|                     # (L, H, n, n)

Chefer et al. 2021 relevance rollout ("Generic Attention-model Explainability for Interpreting
Bi-Modal and Encoder-Decoder Transformers", eq. 5-6), for self-attention::

    Ā_l = mean_h ( (∂target/∂A[l, h] ⊙ A[l, h])⁺ )             # (n, n), positive part
    R = I;  for l = first .. last:  R = R + Ā_l · R

R[i, j] is the relevance of input token j for position i after the last layer; Chefer et al.
read the [CLS] row (R[0]) for a classifier. The identity puts 1 on every token's own entry
whatever the model does, so token scores and figures use R − I (what the attention layers add;
Chefer et al.'s BERT code likewise zeroes the [CLS] → [CLS] entry).

Token scores (one value per input token, for one query row: [CLS] = 0 for encoders, the last
token for causal LMs), the five methods of the faithfulness check (attnpipe/analyze/faithfulness.py):

    raw        A[last layer] averaged over heads, query row
    rollout    attnpipe.analyze.rollout.rollout (Abnar & Zuidema 2020, mean over heads), query row
    flow       attnpipe.analyze.flow.attention_flow, query row (slow: max-flow)
    gradweight G[last layer] averaged over heads, query row
    chefer     R − I, query row
    grad_input |gradient × input| on the word embeddings (the reference of the Spearman check)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from attnpipe.errors import AttnpipeError
from attnpipe.analyze.rollout import rollout, start_position, token_pair_table

METHODS: tuple[str, ...] = ("raw", "rollout", "flow", "gradweight", "chefer")


def _check(attention: np.ndarray, grad: np.ndarray) -> None:
    if grad is None:
        raise AttnpipeError(
            "the file holds no attention gradients: extract it with --explain (see README, 'Gradients')"
        )
    if np.shape(attention) != np.shape(grad) or np.ndim(attention) != 4:
        raise AttnpipeError(
            f"attention {np.shape(attention)} and gradient {np.shape(grad)} must both be (layer, head, n, n)"
        )


def gradient_weighted(attention: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(L, H, n, n) A ⊙ |∂target/∂A|."""
    _check(attention, grad)
    return np.asarray(attention, dtype=np.float64) * np.abs(np.asarray(grad, dtype=np.float64))


def chefer_layers(attention: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """(L, H, n, n) -> (L, n, n): mean over heads of the positive part of ∇A ⊙ A."""
    _check(attention, grad)
    product = np.asarray(grad, dtype=np.float64) * np.asarray(attention, dtype=np.float64)
    return np.clip(product, 0.0, None).mean(axis=1)


def chefer_relevance(attention: np.ndarray, grad: np.ndarray, start: int = 0) -> np.ndarray:
    """(L, H, n, n) -> (n, n): R = I; R += Ā_l · R for each stored layer from position `start`."""
    layers = chefer_layers(attention[start:], grad[start:])
    relevance = np.eye(layers.shape[-1])
    for layer in layers:
        relevance = relevance + layer @ relevance
    return relevance


def default_query_row(model_type: str, n: int) -> int:
    """[CLS] (0) for encoders, the last token for causal LMs (what they predict from)."""
    from attnpipe.models import is_causal  # the one list of causal model types (the families' CAUSAL)

    return n - 1 if is_causal(model_type) else 0


def token_scores(item, layers: Sequence[int], row: int, methods: Sequence[str] = METHODS) -> dict[str, np.ndarray]:
    """Each method's (n,) scores of the input tokens for query `row` of one TextAttention."""
    start = start_position(layers, None)  # rollout, flow and Chefer need consecutive layers
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise AttnpipeError(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    scores: dict[str, np.ndarray] = {}
    for method in methods:
        if method == "raw":
            scores[method] = item.attention[-1].astype(np.float64).mean(axis=0)[row]
        elif method == "rollout":
            scores[method] = rollout(item.attention, start=start)[row]
        elif method == "flow":
            scores[method] = _flow_row(item.attention, start, row)
        elif method == "gradweight":
            scores[method] = gradient_weighted(item.attention[-1:], item.attention_grad[-1:])[0].mean(axis=0)[row]
        elif method == "chefer":
            relevance = chefer_relevance(item.attention, item.attention_grad, start)
            scores[method] = (relevance - np.eye(len(relevance)))[row]
    if item.token_grad_input is not None:
        scores["grad_input"] = np.abs(item.token_grad_input.astype(np.float64))
    return scores


def _flow_row(attention: np.ndarray, start: int, row: int) -> np.ndarray:
    from attnpipe.analyze.flow import attention_flow

    n = attention.shape[-1]
    if row in (0, n - 1):
        return attention_flow(attention, start=start, query="cls" if row == 0 else "last")[0]
    raise AttnpipeError(f"flow is computed for the first or last row only, not row {row}")


def text_relevance(item, layers: Sequence[int], query: str = "auto", model_type: str = "") -> pd.DataFrame:
    """Long table for one text: text_id, query, key, tokens, and columns raw, rollout,
    gradweight, chefer (the query row of each map)."""
    _check(item.attention, item.attention_grad)
    n = item.num_tokens
    row = {"auto": default_query_row(model_type, n), "cls": 0, "last": n - 1}[query]
    scores = token_scores(item, layers, row, ("raw", "rollout", "gradweight", "chefer"))
    rows = np.array([row])
    return token_pair_table(item, rows, **{m: scores[m][None] for m in ("raw", "rollout", "gradweight", "chefer")},
                            grad_input=scores["grad_input"][None])


def maps(item, layers: Sequence[int]) -> dict[str, np.ndarray]:
    """The four (n, n) maps drawn side by side: raw attention and gradient-weighted attention of
    the last stored layer (mean over heads), plain rollout, Chefer relevance."""
    _check(item.attention, item.attention_grad)
    start = start_position(layers, None)
    return {
        "raw attention (last layer, mean of heads)": item.attention[-1].astype(np.float64).mean(axis=0),
        "rollout (Abnar & Zuidema 2020)": rollout(item.attention, start=start),
        "A ⊙ |∇A| (last layer, mean of heads)": gradient_weighted(item.attention[-1:], item.attention_grad[-1:])[0].mean(axis=0),
        "relevance − I (Chefer et al. 2021)": chefer_relevance(item.attention, item.attention_grad, start)
        - np.eye(item.num_tokens),
    }
