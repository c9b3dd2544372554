"""Self-attention attribution by integrated gradients (Hao et al. 2021, "Self-Attention
Attribution: Interpreting Information Interactions Inside Transformer", AAAI), in our own pass.

For one attention layer l of one kind, with A its (H, Q, K) probabilities on the input and F the
explained scalar of `--explain` (attnpipe.extract.gradients.Objective):

    Attr(A) = A ⊙ ∫₀¹ ∂F(α·A)/∂A dα          (H, Q, K), every head of the layer scaled together

F(α·A) is the model with layer l's attention replaced by α·A and every other layer computed as
usual (the paper's definition: earlier layers are unchanged by construction, later layers see
what the scaled layer hands them). The integral is a quadrature of M steps:

    gausslegendre    (default; as captum's default) Gauss–Legendre nodes and weights on [0, 1]:
                     exact for integrands that are polynomials of degree < 2M
    riemann_right    α = k/M, k = 1..M, weights 1/M: the paper's Riemann sum (its M = 20)
    riemann_middle   α = (k - ½)/M, weights 1/M

Completeness: Σ Attr = F(A) − F(0) exactly for the integral, so each layer records
`gap = Σ Attr − (F(A) − F(0))` (with `delta = F(A) − F(0)`), which shows how good M was.

How α scales the attention: every family multiplies each head's context `A·V` by a gate
(attnpipe.attention.head_context), and (α·A)·V = α·(A·V), so a gate of α on every head of layer l
*is* the forward pass with that layer's attention scaled by α. With P the layer's probabilities
(the same for every α: nothing before layer l changes), ∂F/∂P at gate α = α · ∂F/∂(αA), hence
∂F/∂(αA) = (∂F/∂P) / α. No node is 0 (that is why riemann_left and trapezoid, which evaluate
α = 0, are not offered). The M steps of one layer run as one batch of M copies of the input, copy
b with gates α_b on layer l (gates per copy, (L, B, H), as the head ablation uses them), plus one
copy at α = 0 for F(0).

Example::

    from attnpipe.extract.gradients import build_objective, parse_target
    from attnpipe.extract.attribution import attention_attribution
    objective = build_objective(model, parse_target("predicted"))
    result = attention_attribution(model, objective, {"input_ids": ids, "attention_mask": ones},
                                   label=1, layers={"self": [0, 5]}, steps=20)
    result.attribution["self"].shape        # (2, H, n, n): layers 0 and 5, every head
    result.gap["self"]                      # (2,) Σ Attr − (F(A) − F(0)) per layer
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from attnpipe.errors import AttnpipeError
from attnpipe.extract import gradients

IGMethod = Literal["gausslegendre", "riemann_right", "riemann_middle"]
IG_METHODS = ("gausslegendre", "riemann_right", "riemann_middle")
DEFAULT_IG_STEPS = 20  # the paper's m = 20
DEFAULT_IG_METHOD: IGMethod = "gausslegendre"
ATTRIBUTIONS = ("ig",)  # --attribution choices
IG_BATCH = 32  # scaled copies of an input per forward pass


def check_settings(steps: int, method: str) -> None:
    """Refuse M < 1 or an unknown quadrature, before any model loads."""
    if steps < 1:
        raise AttnpipeError(f"--ig-steps must be at least 1, got {steps}")
    if method not in IG_METHODS:
        raise AttnpipeError(f"--ig-method {method!r} is not one of {', '.join(IG_METHODS)}")


def check_request(explain: str | None, attribution: str | None, steps: int | None, method: str | None) -> None:
    """The --attribution / --ig-steps / --ig-method flags as given (None = not given)."""
    if attribution is None:
        flag = "--ig-steps" if steps is not None else "--ig-method"
        raise AttnpipeError(f"{flag} goes with --attribution ig (and --explain T)")
    if attribution not in ATTRIBUTIONS:
        raise AttnpipeError(f"--attribution {attribution!r} is not one of {', '.join(ATTRIBUTIONS)}")
    if explain is None:
        raise AttnpipeError("--attribution ig needs --explain T: it integrates the gradient of that target "
                            "(e.g. --explain predicted)")
    check_settings(DEFAULT_IG_STEPS if steps is None else steps, DEFAULT_IG_METHOD if method is None else method)


def quadrature(steps: int, method: IGMethod = DEFAULT_IG_METHOD) -> tuple[np.ndarray, np.ndarray]:
    """(alphas, weights) on [0, 1] for M = steps nodes; the weights sum to 1. None is 0."""
    check_settings(steps, method)
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)  # on [-1, 1]
        return (nodes + 1) / 2, weights / 2
    k = np.arange(1, steps + 1, dtype=np.float64)
    alphas = k / steps if method == "riemann_right" else (k - 0.5) / steps
    return alphas, np.full(steps, 1.0 / steps)


@dataclass(frozen=True)
class Attribution:
    """Per attention kind, for the asked layers (in the order given), every head of each."""

    attribution: dict[str, np.ndarray]  # kind -> (L', H, Q, K) float32: A ⊙ ∫ ∂F(αA)/∂A dα
    gap: dict[str, np.ndarray]  # kind -> (L',) float64: Σ Attr − (F(A) − F(0))
    delta: dict[str, np.ndarray]  # kind -> (L',) float64: F(A) − F(0)


def attention_attribution(model, objective: gradients.Objective, batch, label: int,
                          layers: Mapping[str, Sequence[int]], steps: int = DEFAULT_IG_STEPS,
                          method: IGMethod = DEFAULT_IG_METHOD) -> Attribution:
    """Integrated-gradients attribution of each asked layer's attention for one unpadded input.

    `label` is the class / token explained (the one chosen at gates = 1); `layers` maps a kind
    ("self", and "decoder" / "cross" for encoder-decoders) to model layer indices."""
    alphas, weights = quadrature(steps, method)
    batch = gradients.as_batch(model, batch)
    shapes = gradients.gate_shapes(model.weights, model.family.KINDS)
    attribution, gap, delta = {}, {}, {}
    for kind, kind_layers in layers.items():
        rows, gaps, deltas = [], [], []
        for layer in kind_layers:
            attr, full, zero = _layer_attribution(model, objective, batch, label, kind, layer, shapes[kind],
                                                  alphas, weights)
            rows.append(attr)
            deltas.append(full - zero)
            gaps.append(float(attr.sum(dtype=np.float64)) - (full - zero))
        attribution[kind] = np.stack(rows) if rows else np.zeros((0,), np.float32)
        gap[kind], delta[kind] = np.asarray(gaps, np.float64), np.asarray(deltas, np.float64)
    return Attribution(attribution, gap, delta)


def _layer_attribution(model, objective, batch, label: int, kind: str, layer: int, shape: tuple[int, int],
                       alphas: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float, float]:
    """(Attr (H, Q, K) float32, F(A), F(0)) for one layer: the M scaled copies in batches."""
    num_layers, num_heads = shape
    # α = 1 (F(A)) and α = 0 (F(0)) ride along as the last two copies; their gradients are not used.
    scales = np.concatenate([alphas, [1.0, 0.0]])
    integral, values, probs = None, [], None
    own_weights, own_batch, leaf = gradients.differentiable_input(model, batch)  # P on the autograd path
    for first in range(0, len(scales), IG_BATCH):
        part = torch.as_tensor(scales[first:first + IG_BATCH], dtype=leaf.dtype, device=leaf.device)  # (B,)
        size = len(part)
        gates = torch.ones(num_layers, size, num_heads, dtype=leaf.dtype, device=leaf.device)
        gates[layer] = part[:, None]  # (L, B, H): copy b scales layer `layer`'s attention by α_b
        copies = {key: value.expand(size, *value.shape[1:]) for key, value in own_batch.items()}
        with torch.enable_grad():
            out = model.family.forward(own_weights, copies, head_gates={kind: gates})
            p = out.attentions[kind][layer]  # (B, H, Q, K), the same values in every copy
            value = objective.value(objective.states(out), label)  # (B,)
            steps_here = max(0, min(size, len(alphas) - first))  # copies that are quadrature nodes
            if steps_here:  # only the layers above `layer` are differentiated (autograd.grad stops at p)
                (grad,) = torch.autograd.grad(value[:steps_here].sum(), p)
        values.append(value.detach().double().cpu())
        if steps_here:
            node = slice(first, first + steps_here)
            # ∂F/∂(αA) = (∂F/∂P) / α, weighted and summed over this part's nodes: (H, Q, K)
            scale = torch.as_tensor(weights[node] / alphas[node], dtype=torch.float64, device=p.device)
            part_sum = (grad[:steps_here].double() * scale[:, None, None, None]).sum(0)
            integral = part_sum if integral is None else integral + part_sum
        if probs is None:
            probs = p[0].detach().double()
    values = torch.cat(values).numpy()
    attr = (probs * integral).float().cpu().numpy()  # A ⊙ ∫ ∂F(αA)/∂A dα
    return attr, float(values[-2]), float(values[-1])
