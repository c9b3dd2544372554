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

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from attnpipe.attention import attention_probs, causal_mask, merge_heads, padding_mask, split_heads
from attnpipe.models.parts import LayerNorm, Linear, Seq2SeqOutput, layer_norm, linear

MODEL_TYPES = ("bart", "marian")
SEQ2SEQ = True  # forward_seq2seq(weights, src_ids, src_mask, tgt_ids, tgt_mask) instead of forward
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
    embed: torch.Tensor  # (vocab, hidden)
    positions: torch.Tensor  # (max_positions + offset, hidden)
    embed_norm: LayerNorm | None  # BART's layernorm_embedding; None for Marian
    layers: tuple[Layer, ...]
    num_heads: int


@dataclass(frozen=True)
class Weights:
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
        # Marian's decoder may have its own vocabulary (share_encoder_decoder_embeddings=False).
        embed=stack.embed_tokens.weight.detach(),
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
        encoder=_stack(model.encoder, config.encoder_attention_heads),
        decoder=_stack(model.decoder, config.decoder_attention_heads),
        embed_scale=model.encoder.embed_scale if config.model_type == "marian"
        else model.encoder.embed_tokens.embed_scale,  # BartScaledWordEmbedding multiplies inside
        position_offset=POSITION_OFFSET[config.model_type],
        act=ACT2FN[config.activation_function],
    )


def embed(weights: Weights, stack: Stack, ids: torch.Tensor) -> torch.Tensor:
    """scale · token + position (+ BART's layernorm_embedding): (B, T, hidden).

    Right padding: every text's real tokens start at position 0, so positions are 0..T-1.
    """
    positions = torch.arange(ids.shape[1], device=ids.device) + weights.position_offset
    x = F.embedding(ids, stack.embed) * weights.embed_scale + F.embedding(positions, stack.positions)[None]
    return x if stack.embed_norm is None else stack.embed_norm(x)


def _attend(att: Attention, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, num_heads: int):
    q = split_heads(att.q(x), num_heads)  # (B, H, Q, D)
    k = split_heads(att.k(memory), num_heads)  # (B, H, K, D)
    v = split_heads(att.v(memory), num_heads)  # (B, H, K, D)
    probs = attention_probs(q, k, att.scale, mask)  # (B, H, Q, K)
    return att.o(merge_heads(torch.matmul(probs, v))), probs


def _ff(weights: Weights, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    return layer.final_norm(x + layer.fc2(weights.act(layer.fc1(x))))


def forward_seq2seq(
    weights: Weights,
    src_ids: torch.Tensor,  # (B, S), right-padded
    src_mask: torch.Tensor,  # (B, S), 1 = real token
    tgt_ids: torch.Tensor,  # (B, T) decoder input ids (start token + target shifted right), right-padded
    tgt_mask: torch.Tensor,  # (B, T)
    keep_layers: frozenset[int] | None = None,  # encoder layers whose attention is returned
    keep_decoder_layers: frozenset[int] | None = None,  # decoder layers (self and cross)
) -> Seq2SeqOutput:
    enc, dec = weights.encoder, weights.decoder
    x = embed(weights, enc, src_ids)  # (B, S, hidden)
    enc_mask = padding_mask(src_mask, x.dtype)  # (B, 1, 1, S)
    enc_attn: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(enc.layers):
        out, probs = _attend(layer.self_attn, x, x, enc_mask, enc.num_heads)  # (B, H, S, S)
        if keep_layers is None or index in keep_layers:
            enc_attn[index] = probs
        x = layer.self_norm(x + out)  # post-norm: normalise after the residual sum
        x = _ff(weights, layer, x)
    memory = x  # (B, S, hidden)

    y = embed(weights, dec, tgt_ids)  # (B, T, hidden)
    t = y.shape[1]
    dec_mask = causal_mask(t, y.dtype, y.device) + padding_mask(tgt_mask, y.dtype)  # (B, 1, T, T)
    dec_mask = dec_mask.clamp(min=torch.finfo(y.dtype).min)  # two blocked terms must not overflow
    dec_attn: dict[int, torch.Tensor] = {}
    cross_attn: dict[int, torch.Tensor] = {}
    for index, layer in enumerate(dec.layers):
        keep = keep_decoder_layers is None or index in keep_decoder_layers
        out, probs = _attend(layer.self_attn, y, y, dec_mask, dec.num_heads)  # (B, H, T, T)
        if keep:
            dec_attn[index] = probs
        y = layer.self_norm(y + out)
        out, probs = _attend(layer.cross_attn, y, memory, enc_mask, dec.num_heads)  # (B, H, T, S)
        if keep:
            cross_attn[index] = probs
        y = layer.cross_norm(y + out)
        y = _ff(weights, layer, y)
    return Seq2SeqOutput(
        encoder_hidden=memory,
        decoder_hidden=y,
        encoder_attentions=enc_attn,
        decoder_attentions=dec_attn,
        cross_attentions=cross_attn,
    )
