"""`--method hf`: attention read from transformers' own eager `output_attentions`, for any model.

The fallback for model types attnpipe has no explicit forward pass for, driven through the same
family interface as the others (chosen by --method hf, not by model_type, so MODEL_TYPES is
empty). The numbers are whatever transformers computes; nothing here proves them, so files
carry `method = "hf"`. The model is loaded by attnpipe.extract (eager attention, float32).

Guards against the silent failures seen with transformers 5 (docs: shared pitfalls): an empty
or short attention tuple (sdpa returns an empty one), a mis-shaped layer, or NaN / inf on real
tokens is reported, never handed on. Encoder-decoder models are not handled here.

Head gates: transformers 5 removed `head_mask`, so there is no place to gate a head inside the
model's own forward; `head_gates` is refused with a one-line error (--explain needs one of our
forward passes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from attnpipe.errors import AttnpipeError
from attnpipe.models.parts import OnLayer, Output, empty_attentions, hand_over

MODEL_TYPES: tuple[str, ...] = ()  # chosen by --method hf, for any model_type
INPUT_KIND = "text"
CAUSAL = False  # whether the model is causal is carried by HFWeights.causal
KINDS = ("self",)
WORD_EMBEDDINGS = None  # the model's own modules: no table of ours to differentiate


@dataclass(frozen=True)
class HFWeights:
    """Stands in for a family's Weights: the transformers model itself and its sizes."""

    model: torch.nn.Module
    num_layers: int
    num_heads: int
    causal: bool = False  # queries see only earlier keys (a causal LM's model_type)
    token_type: None = None  # token types are left to the model's defaults (all zero)


def load_weights(model: torch.nn.Module) -> HFWeights:
    """The model itself, sized from its config (the caller loads it on eager attention)."""
    config = model.config

    def size(names: tuple[str, ...], what: str) -> int:
        for name in names:
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        raise AttnpipeError(f"--method hf: cannot tell the number of {what} from config.json "
                            f"(none of {', '.join(names)})")

    from attnpipe.models import CAUSAL_MODEL_TYPES  # the package imports the families, not this module

    architectures = getattr(config, "architectures", None) or ()
    return HFWeights(
        model=model,
        num_layers=size(("num_hidden_layers", "n_layer", "num_layers"), "layers"),
        num_heads=size(("num_attention_heads", "n_head", "num_heads"), "heads"),
        causal=getattr(config, "model_type", None) in CAUSAL_MODEL_TYPES
        or bool(getattr(config, "is_decoder", False))
        or any(name.endswith("ForCausalLM") for name in architectures),
    )


def check_attentions(attentions, attention_mask: torch.Tensor, num_layers: int, num_heads: int,
                     finite: bool = True) -> None:
    """Refuse what transformers returned when it is empty, mis-shaped or (with `finite`) not finite
    on real tokens. The runner passes finite=False: its guards check every value and name the
    text, layer and head."""
    if not attentions:
        raise AttnpipeError("transformers returned no attentions (an empty tuple): the model is not on "
                            "eager attention or does not support output_attentions")
    b, t = attention_mask.shape
    if len(attentions) != num_layers:
        raise AttnpipeError(f"transformers returned attention for {len(attentions)} layers, "
                            f"but the config says {num_layers}")
    real = attention_mask.bool()
    pairs = real[:, None, :, None] & real[:, None, None, :]  # (B, 1, Q, K) real query and key
    for index, probs in enumerate(attentions):
        if probs is None or tuple(probs.shape) != (b, num_heads, t, t):
            shape = None if probs is None else tuple(probs.shape)
            raise AttnpipeError(f"layer {index} attention has shape {shape}; expected {(b, num_heads, t, t)}")
        if finite and not torch.isfinite(probs.masked_fill(~pairs, 0.0)).all():
            raise AttnpipeError(f"layer {index} attention holds NaN or inf on real tokens: refusing to store it")


def forward(
    weights: HFWeights,
    batch: Mapping[str, torch.Tensor],  # input_ids (B, T), attention_mask (B, T) [, token_type_ids]
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,
    head_gates: Mapping[str, torch.Tensor] | None = None,
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # False: the attention only (the pass may stop after the last kept layer)
) -> Output:
    """The family interface over transformers' eager output_attentions."""
    if head_gates is not None:
        raise AttnpipeError("--method hf has no head gates (transformers 5 removed head_mask): "
                            "--explain needs one of attnpipe's own forward passes (drop --method hf)")
    out = weights.model(**batch, output_attentions=True)
    # finite=False: NaN/inf are left to the runner's guards, which name the text, layer and head.
    check_attentions(out.attentions, batch["attention_mask"], weights.num_layers, weights.num_heads, finite=False)
    attentions = empty_attentions(KINDS)
    # transformers computed every layer already: hand them over in order
    for index, probs in enumerate(out.attentions):
        hand_over("self", index, probs.float(), keep_layers, attentions, on_layer)
    return Output(hidden=getattr(out, "last_hidden_state", None), attentions=attentions)
