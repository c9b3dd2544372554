"""BART and Marian: post-norm encoder-decoders with absolute positions (Marian: the translation
models of seed 003).

    embeddings:     x = scale · E[token] + P[position]         scale = √hidden with scale_embedding
                    BART then applies layernorm_embedding; Marian does not
    encoder layer:  a = norm_1(x + W_o · attention(x, x))
                    y = norm_2(a + W_2 · act(W_1 · a))
    decoder layer:  a = norm_1(x + W_o · attention(x, x))                causal
                    c = norm_2(a + W_o' · attention(a, encoder))         cross-attention
                    y = norm_3(c + W_2 · act(W_1 · c))

No final norm after either stack (that is mBART, not handled here). The two differ only in
their embeddings: BART's positions are a learned table read at position + 2 (a leftover offset
of fairseq's padding scheme), Marian's are a fixed sinusoidal table (sin in the first half of the
vector, cos in the second) read at the position itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from attnpipe.models.activations import activation

from attnpipe.attention import (
    attention_probs, causal_mask, head_context, merge_heads, padding_mask, split_heads,
)
from attnpipe.models.parts import (
    LayerNorm, Linear, OnLayer, Output, empty_attentions, hand_over, layer_gates, layer_norm, linear,
)

MODEL_TYPES = ("bart", "marian")
INPUT_KIND = "pairs"
CAUSAL = False  # the encoder is bidirectional; the "decoder" kind is causal by definition
KINDS = ("self", "decoder", "cross")
WORD_EMBEDDINGS = "embed"  # Weights.embed: the encoder's (vocab, E) token table, before scale and positions
# The decoder's (vocab, E) table: gradients make its rows leaves too, so that the decoder's first
# self-attention (which no source token reaches) is on the autograd path.
DECODER_WORD_EMBEDDINGS = "decoder_embed"
POSITION_OFFSET = {"bart": 2, "marian": 0}  # BartLearnedPositionalEmbedding.offset; Marian has none


@dataclass(frozen=True)
class Attention:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    scale: float  # 1/√d_head


@dataclass(frozen=True)
class Layer:
    self_attn: Attention
    self_norm: LayerNorm
    cross_attn: Attention | None  # decoder layers only
    cross_norm: LayerNorm | None
    fc1: Linear
    fc2: Linear
    final_norm: LayerNorm


@dataclass(frozen=True)
class Stack:
    positions: torch.Tensor  # (max_positions + offset, hidden)
    embed_norm: LayerNorm | None  # BART's layernorm_embedding; None for Marian
    layers: tuple[Layer, ...]
    num_heads: int


@dataclass(frozen=True)
class Weights:
    embed: torch.Tensor  # (vocab, hidden) the encoder's token table
    # Marian's decoder may have its own vocabulary (share_encoder_decoder_embeddings=False).
    decoder_embed: torch.Tensor  # (vocab', hidden)
    encoder: Stack
    decoder: Stack
    embed_scale: float  # √hidden with config.scale_embedding, else 1
    position_offset: int
    act: Callable[[torch.Tensor], torch.Tensor]
    token_type: None = None  # no token types

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def num_heads(self) -> int:
        return self.encoder.num_heads

    @property
    def decoder_num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def decoder_num_heads(self) -> int:
        return self.decoder.num_heads


def _attention(module) -> Attention:
    return Attention(
        linear(module.q_proj), linear(module.k_proj), linear(module.v_proj), linear(module.out_proj),
        scale=module.scaling,  # head_dim ** -0.5
    )


def _layer(layer) -> Layer:
    cross = getattr(layer, "encoder_attn", None)
    return Layer(
        self_attn=_attention(layer.self_attn),
        self_norm=layer_norm(layer.self_attn_layer_norm),
        cross_attn=None if cross is None else _attention(cross),
        cross_norm=None if cross is None else layer_norm(layer.encoder_attn_layer_norm),
        fc1=linear(layer.fc1),
        fc2=linear(layer.fc2),
        final_norm=layer_norm(layer.final_layer_norm),
    )


def _stack(stack, num_heads: int) -> Stack:
    norm = getattr(stack, "layernorm_embedding", None)
    return Stack(
        # Marian's sinusoidal table is not saved in checkpoints: transformers rebuilds it at load
        # time (MarianSinusoidalPositionalEmbedding.create_weight), so reading it here is exact.
        positions=stack.embed_positions.weight.detach(),
        embed_norm=None if norm is None else layer_norm(norm),
        layers=tuple(_layer(layer) for layer in stack.layers),
        num_heads=num_heads,
    )


def load_weights(model) -> Weights:
    """Read a transformers BartModel or MarianModel (AutoModel of the folder) into `Weights`."""
    config = model.config
    return Weights(
        embed=model.encoder.embed_tokens.weight.detach(),
        decoder_embed=model.decoder.embed_tokens.weight.detach(),
        encoder=_stack(model.encoder, config.encoder_attention_heads),
        decoder=_stack(model.decoder, config.decoder_attention_heads),
        embed_scale=model.encoder.embed_scale if config.model_type == "marian"
        else model.encoder.embed_tokens.embed_scale,  # BartScaledWordEmbedding multiplies inside
        position_offset=POSITION_OFFSET[config.model_type],
        act=activation(config.activation_function),
    )


def embed(weights: Weights, table: torch.Tensor, stack: Stack, ids: torch.Tensor) -> torch.Tensor:
    """scale · token + position (+ BART's layernorm_embedding): (B, T, hidden).

    Right padding: every text's real tokens start at position 0, so positions are 0..T-1.
    """
    positions = torch.arange(ids.shape[1], device=ids.device) + weights.position_offset
    x = F.embedding(ids, table) * weights.embed_scale + F.embedding(positions, stack.positions)[None]
    return x if stack.embed_norm is None else stack.embed_norm(x)


def _attend(att: Attention, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, num_heads: int):
    """Queries from `x`, keys and values from `memory`: (B, H, Q, K) probabilities, (B, H, K, D) values."""
    q = split_heads(att.q(x), num_heads)  # (B, H, Q, D)
    k = split_heads(att.k(memory), num_heads)  # (B, H, K, D)
    v = split_heads(att.v(memory), num_heads)  # (B, H, K, D)
    return attention_probs(q, k, att.scale, mask), v  # (B, H, Q, K), (B, H, K, D)


def _merge(att: Attention, probs: torch.Tensor, v: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
    """The gated heads' contexts, merged and projected: (B, Q, hidden)."""
    return att.o(merge_heads(head_context(probs, v, gates)))


def _ff(weights: Weights, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    return layer.final_norm(x + layer.fc2(weights.act(layer.fc1(x))))


def forward(
    weights: Weights,
    batch: Mapping[str, torch.Tensor],  # input_ids, attention_mask (B, S); decoder_input_ids, decoder_attention_mask (B, T)
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,  # per kind: "self" (encoder), "decoder", "cross"
    head_gates: Mapping[str, torch.Tensor] | None = None,  # per kind: (L, H) or (L, B, H) multipliers
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # accepted; the whole pass runs (the decoder reads every encoder layer's output)
) -> Output:
    """Encoder over the source, then the decoder (teacher forcing) over decoder_input_ids
    (start token + target shifted right); both right-padded."""
    enc, dec = weights.encoder, weights.decoder
    attentions = empty_attentions(KINDS)

    def sublayer(kind: str, index: int, att: Attention, x, memory, mask, num_heads: int) -> torch.Tensor:
        probs, v = _attend(att, x, memory, mask, num_heads)  # (B, H, Q, K), (B, H, K, D)
        hand_over(kind, index, probs, keep_layers, attentions, on_layer)
        return _merge(att, probs, v, layer_gates(head_gates, kind, index))  # (B, Q, hidden)

    x = embed(weights, weights.embed, enc, batch["input_ids"])  # (B, S, hidden)
    enc_mask = padding_mask(batch["attention_mask"], x.dtype)  # (B, 1, 1, S)
    for index, layer in enumerate(enc.layers):
        out = sublayer("self", index, layer.self_attn, x, x, enc_mask, enc.num_heads)  # attention (B, H, S, S)
        x = layer.self_norm(x + out)  # post-norm: normalise after the residual sum
        x = _ff(weights, layer, x)
    memory = x  # (B, S, hidden)

    y = embed(weights, weights.decoder_embed, dec, batch["decoder_input_ids"])  # (B, T, hidden)
    t = y.shape[1]
    dec_mask = causal_mask(t, y.dtype, y.device) + padding_mask(batch["decoder_attention_mask"], y.dtype)  # (B, 1, T, T)
    dec_mask = dec_mask.clamp(min=torch.finfo(y.dtype).min)  # two blocked terms must not overflow
    for index, layer in enumerate(dec.layers):
        out = sublayer("decoder", index, layer.self_attn, y, y, dec_mask, dec.num_heads)  # attention (B, H, T, T)
        y = layer.self_norm(y + out)
        out = sublayer("cross", index, layer.cross_attn, y, memory, enc_mask, dec.num_heads)  # (B, H, T, S)
        y = layer.cross_norm(y + out)
        y = _ff(weights, layer, y)
    return Output(hidden=y, attentions=attentions, encoder_hidden=memory)
