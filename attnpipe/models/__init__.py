"""Architecture families: each module maps a transformers model's weights and runs our forward pass.

`FAMILIES` maps a config's `model_type` to the module that handles it. Every family module has
the same small interface: `MODEL_TYPES`, `load_weights(model) -> Weights` (with `num_layers`,
`num_heads` and `token_type`) and
`forward(weights, input_ids, attention_mask, token_type_ids, keep_layers, on_layer=None) -> Output`
(final hidden state, and per kept layer the (B, H, Q, K) attention probabilities; with
`on_layer(index, probs)` each kept layer is handed to the callback as soon as it is computed
instead of being kept, so long inputs never hold all layers at once).
"""

from __future__ import annotations

from types import ModuleType

from attnpipe.models import bert, gpt2, llama

FAMILIES: dict[str, ModuleType] = {
    model_type: family for family in (bert, gpt2, llama) for model_type in family.MODEL_TYPES
}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
