"""Architecture families: each module maps a transformers model's weights and runs our forward pass.

`FAMILIES` maps a config's `model_type` to the module that handles it. Every family module has
the same small interface: `MODEL_TYPES`, `load_weights(model) -> Weights` (with `num_layers`,
`num_heads` and `token_type`) and
`forward(weights, input_ids, attention_mask, token_type_ids, keep_layers, head_gates=None,
on_layer=None) -> Output` (final hidden state, and per kept layer the (B, H, Q, K) attention
probabilities; with `on_layer(index, probs)` each kept layer is handed to the callback as soon
as it is computed instead of being kept, so long inputs never hold all layers at once).
`head_gates` is an optional (L, H) tensor multiplying each head's context before the heads are
merged (Michel et al. 2019; None = no gating; used by attnpipe/extract/gradients.py).

Encoder-decoder families (`SEQ2SEQ = True`: t5, mt5, bart, marian) run source and target together:
`forward_seq2seq(weights, src_ids, src_mask, tgt_ids, tgt_mask, keep_layers, keep_decoder_layers)
-> Seq2SeqOutput`, and their `Weights` also have `decoder_num_layers` / `decoder_num_heads`.
"""

from __future__ import annotations

from types import ModuleType

from attnpipe.models import bart, bert, gpt2, llama, t5, vit

FAMILIES: dict[str, ModuleType] = {
    model_type: family for family in (bert, gpt2, llama, t5, bart) for model_type in family.MODEL_TYPES
}
# Image models take pixels, not token ids: their forward is `forward(weights, pixel_values,
# keep_layers)`, run by attnpipe.extract.images. (models/torch_encoder.py takes a user's
# nn.Module instead of a transformers folder and is run by attnpipe.extract.embeddings.)
IMAGE_FAMILIES: dict[str, ModuleType] = {model_type: vit for model_type in vit.MODEL_TYPES}


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def is_seq2seq(model_type: str) -> bool:
    """Whether `model_type` is an encoder-decoder family (forward_seq2seq, source/target pairs)."""
    return getattr(FAMILIES.get(model_type), "SEQ2SEQ", False)
