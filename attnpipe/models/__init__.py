"""Architecture families: each module maps a transformers model's weights and runs our forward pass.

`FAMILIES` maps a config's `model_type` to the module that handles it. Every family module has
the same small interface: `MODEL_TYPES`, `load_weights(model) -> Weights` (with `num_layers`,
`num_heads` and `token_type`) and
`forward(weights, input_ids, attention_mask, token_type_ids, keep_layers) -> Output`
(final hidden state, and per kept layer the (B, H, Q, K) attention probabilities).
"""

from __future__ import annotations

from types import ModuleType

from attnpipe.models import bert, gpt2, llama, vit

FAMILIES: dict[str, ModuleType] = {
    model_type: family for family in (bert, gpt2, llama) for model_type in family.MODEL_TYPES
}
# Image models take pixels, not token ids: their forward is `forward(weights, pixel_values,
# keep_layers)`, run by attnpipe.extract_vision. (models/torch_encoder.py takes a user's
# nn.Module instead of a transformers folder and is run by attnpipe.extract_torch.)
IMAGE_FAMILIES: dict[str, ModuleType] = {model_type: vit for model_type in vit.MODEL_TYPES}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)
