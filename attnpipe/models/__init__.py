"""Architecture families: each module maps a model's weights and runs our forward pass.

Every family module (bert, gpt2, llama, t5, bart, vit, torch_encoder, and hf, the
`--method hf` fallback over transformers' own eager attention) has the same small interface:

    MODEL_TYPES       config `model_type` values it handles ("torch" for torch_encoder; hf: ())
    INPUT_KIND        "text" | "pairs" | "image" | "embeddings"
    CAUSAL            whether its (decoder-only) self-attention is causal; t5/bart: False (their
                      "decoder" kind is causal by definition); torch_encoder / hf: False, a run's
                      causality is carried by `Weights.causal` (use `CAUSAL or weights.causal`)
    KINDS             ("self",), or ("self", "decoder", "cross") for encoder-decoders
    WORD_EMBEDDINGS   the Weights field holding the (vocab, E) table gradient x input
                      differentiates; None where the inputs are not token ids (vit, torch, hf);
                      encoder-decoders also name DECODER_WORD_EMBEDDINGS (the decoder's table)

    load_weights(model) -> Weights          with num_layers, num_heads (encoder-decoders also
                                            decoder_num_layers, decoder_num_heads)
    forward(weights, batch, *, keep_layers=None, head_gates=None, on_layer=None, hidden=True)
                                            -> parts.Output

`batch` holds tensors named as transformers names them, so the same dict can be given to the
transformers model for --verify (`hf_model(**batch, output_attentions=True)`):

    text        input_ids (B, T), attention_mask (B, T) [, token_type_ids (B, T)]
    pairs       input_ids, attention_mask (source); decoder_input_ids, decoder_attention_mask
    image       pixel_values (B, C, H, W)
    embeddings  inputs_embeds (B, T, E), attention_mask (B, T)

`keep_layers` maps a kind to the layer indices whose attention is wanted (a kind missing, or
None: every layer). `head_gates` maps a kind to (L, H), or per text (L, B, H), multipliers on each
head's context before the heads are merged (Michel et al. 2019; attention.head_context).
`on_layer(kind, layer, probs)` receives each kept layer's (B, H, Q, K) probabilities as soon as
they are computed, instead of keeping them in `Output.attentions[kind][layer]`, so long inputs
never hold all layers at once. `hidden=False` says the caller wants the attention only (a plain
extraction: no --verify, no gradients): single-stack families then stop after the last kept
layer's attention, skipping its value projection, output projection and feed-forward and every
later layer (`parts.last_layer`), and return `Output.hidden` None; the attention is the same to
the bit (the same operations up to it). Encoder-decoders accept it and run whole. Kinds: "self"
(encoder, or decoder-only self-attention), "decoder" (decoder self-attention), "cross" (decoder ->
encoder).

`FAMILIES` maps `model_type` to the family of every transformers-folder family (text, pairs and
image); torch_encoder and hf are imported by name. `CAUSAL_MODEL_TYPES` is the one list of causal
model types, derived from the families' CAUSAL constants.
"""

from __future__ import annotations

from types import ModuleType

from attnpipe.models import bart, bert, gpt2, llama, t5, vit

FAMILIES: dict[str, ModuleType] = {
    model_type: family for family in (bert, gpt2, llama, t5, bart, vit) for model_type in family.MODEL_TYPES
}
# Image models take pixels and are run with --image / --image-dir (attnpipe.extract.images).
IMAGE_FAMILIES: dict[str, ModuleType] = {t: f for t, f in FAMILIES.items() if f.INPUT_KIND == "image"}
CAUSAL_MODEL_TYPES: frozenset[str] = frozenset(t for t, f in FAMILIES.items() if f.CAUSAL)


def supported_model_types() -> list[str]:
    """The model types a transformers folder of texts or source/target pairs may have (not images)."""
    return sorted(t for t, f in FAMILIES.items() if f.INPUT_KIND in ("text", "pairs"))


def is_seq2seq(model_type: str) -> bool:
    """Whether `model_type` is an encoder-decoder family (source/target pairs, kinds decoder and cross)."""
    family = FAMILIES.get(model_type)
    return family is not None and family.INPUT_KIND == "pairs"


def is_causal(model_type: str) -> bool:
    """Whether the self-attention of `model_type` is causal (queries see only earlier keys)."""
    return model_type in CAUSAL_MODEL_TYPES
