"""T5: a pre-norm encoder-decoder with a learned relative position bias and unscaled logits.

    encoder layer:  a = x + W_o · attention(h, h),  h = norm_1(x)     bias: bidirectional buckets
                    y = a + ff(norm_2(a))
    decoder layer:  a = x + W_o · attention(h, h),  h = norm_1(x)     causal, bias: one-sided buckets
                    c = a + W_o' · attention(norm_2(a), encoder)      cross-attention, no bias
                    y = c + ff(norm_3(c))
    final norm after each stack; ff = W_o · act(W_i · h)  or, gated, W_o · (act(W_0 · h) ⊙ W_1 · h)

The quirks, each commented where it happens: logits are q·kᵀ with *no* 1/√d (T5 folds the scale
into its initialisation); the position bias is a (bucket -> head) table that only the first layer
of each stack owns, computed once and shared by every layer of that stack; the norms are
RMS-style (no mean, no bias).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from attnpipe.models.activations import activation

from attnpipe.attention import (
    attention_probs, causal_mask, head_context, merge_heads, padding_mask, split_heads,
)
from attnpipe.models.parts import Linear, OnLayer, Output, empty_attentions, hand_over, layer_gates, linear

MODEL_TYPES = ("t5", "mt5")  # mT5's modules are T5's, copied under other names
INPUT_KIND = "pairs"
CAUSAL = False  # the encoder is bidirectional; the "decoder" kind is causal by definition
KINDS = ("self", "decoder", "cross")
WORD_EMBEDDINGS = "embed"  # Weights.embed: the encoder's (vocab, E) input table (source tokens)
# The decoder's (vocab, E) table: gradients make its rows leaves too, so that the decoder's first
# self-attention (which no source token reaches) is on the autograd path.
DECODER_WORD_EMBEDDINGS = "decoder_embed"


@dataclass(frozen=True)
class T5Norm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # T5LayerNorm: divide by the root mean square (no mean subtracted, no bias), in float32.
        # (float64 stays float64, for the gradient checks)
        variance = x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


@dataclass(frozen=True)
class Attention:
    q: Linear  # no biases anywhere in T5
    k: Linear
    v: Linear
    o: Linear


@dataclass(frozen=True)
class Layer:
    self_norm: T5Norm
    self_attn: Attention
    cross_norm: T5Norm | None  # decoder layers only
    cross_attn: Attention | None
    ff_norm: T5Norm
    wi: tuple[Linear, ...]  # (wi,) or, gated, (wi_0, wi_1)
    wo: Linear


@dataclass(frozen=True)
class Stack:
    layers: tuple[Layer, ...]
    bias: torch.Tensor  # (buckets, H): the first layer's relative_attention_bias, shared by all
    final_norm: T5Norm
    bidirectional: bool  # encoder: keys on both sides get their own buckets; decoder: only the past


@dataclass(frozen=True)
class Weights:
    embed: torch.Tensor  # (vocab, hidden), encoder input embeddings (shared with the decoder's in T5)
    decoder_embed: torch.Tensor  # (vocab, hidden)
    encoder: Stack
    decoder: Stack
    act: Callable[[torch.Tensor], torch.Tensor]
    num_buckets: int
    max_distance: int
    num_heads: int
    token_type: None = None  # T5 takes no token types

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    @property
    def decoder_num_layers(self) -> int:
        return len(self.decoder.layers)

    @property
    def decoder_num_heads(self) -> int:
        return self.num_heads  # one num_heads for both stacks in T5Config


def _norm(module) -> T5Norm:
    return T5Norm(module.weight.detach(), module.variance_epsilon)


def _attention(module) -> Attention:
    return Attention(linear(module.q), linear(module.k), linear(module.v), linear(module.o))


def _layer(block) -> Layer:
    ff = block.layer[-1]
    dense = ff.DenseReluDense
    wi = (linear(dense.wi_0), linear(dense.wi_1)) if hasattr(dense, "wi_0") else (linear(dense.wi),)
    cross = block.layer[1] if len(block.layer) == 3 else None
    return Layer(
        self_norm=_norm(block.layer[0].layer_norm),
        self_attn=_attention(block.layer[0].SelfAttention),
        cross_norm=None if cross is None else _norm(cross.layer_norm),
        cross_attn=None if cross is None else _attention(cross.EncDecAttention),
        ff_norm=_norm(ff.layer_norm),
        wi=wi,
        wo=linear(dense.wo),
    )


def _stack(stack, bidirectional: bool) -> Stack:
    first = stack.block[0].layer[0].SelfAttention
    return Stack(
        layers=tuple(_layer(block) for block in stack.block),
        bias=first.relative_attention_bias.weight.detach(),  # only block 0 has one
        final_norm=_norm(stack.final_layer_norm),
        bidirectional=bidirectional,
    )


def load_weights(model) -> Weights:
    """Read a transformers T5Model / MT5Model (AutoModel of the folder) into `Weights`."""
    config = model.config
    return Weights(
        embed=model.encoder.embed_tokens.weight.detach(),
        decoder_embed=model.decoder.embed_tokens.weight.detach(),
        encoder=_stack(model.encoder, bidirectional=True),
        decoder=_stack(model.decoder, bidirectional=False),
        act=activation(config.dense_act_fn),  # "gated-gelu" -> gelu_new, gated (T5Config)
        num_buckets=config.relative_attention_num_buckets,
        max_distance=config.relative_attention_max_distance,
        num_heads=config.num_heads,
    )


def relative_bucket(
    relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int
) -> torch.Tensor:
    """Bucket of each key - query distance (Mesh TensorFlow's scheme, as T5Attention computes it).

    Half the buckets hold exact small distances, the other half log-spaced larger ones up to
    `max_distance`; the encoder splits the buckets between keys after and before the query,
    the decoder (which sees only the past) uses all of them for keys at or before the query.
    """
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).long() * num_buckets  # keys after the query: upper half
        distance = relative.abs()
    else:
        distance = -torch.min(relative, torch.zeros_like(relative))  # future keys -> 0 (masked anyway)
    max_exact = num_buckets // 2
    # The same float operations in the same order as transformers: a bucket boundary must not move.
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(distance < max_exact, distance, large)


def position_bias(weights: Weights, stack: Stack, q_len: int, k_len: int, device) -> torch.Tensor:
    """(1, H, Q, K) bias added to the logits of every self-attention layer of `stack`."""
    query = torch.arange(q_len, device=device)[:, None]
    key = torch.arange(k_len, device=device)[None, :]
    bucket = relative_bucket(key - query, stack.bidirectional, weights.num_buckets, weights.max_distance)
    return F.embedding(bucket, stack.bias).permute(2, 0, 1)[None]  # (Q, K, H) -> (1, H, Q, K)


def _attend(att: Attention, x: torch.Tensor, memory: torch.Tensor, mask: torch.Tensor, num_heads: int):
    """Queries from `x`, keys and values from `memory`: (B, H, Q, K) probabilities, (B, H, K, D) values."""
    q = split_heads(att.q(x), num_heads)  # (B, H, Q, D)
    k = split_heads(att.k(memory), num_heads)  # (B, H, K, D)
    v = split_heads(att.v(memory), num_heads)  # (B, H, K, D)
    return attention_probs(q, k, 1.0, mask), v  # T5: no 1/√d scaling of q·kᵀ


def _merge(att: Attention, probs: torch.Tensor, v: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
    """The gated heads' contexts, merged and projected: (B, Q, hidden)."""
    return att.o(merge_heads(head_context(probs, v, gates)))


def _ff(weights: Weights, layer: Layer, x: torch.Tensor) -> torch.Tensor:
    if len(layer.wi) == 2:  # gated (T5 v1.1, flan-t5): act(W_0 h) ⊙ W_1 h
        return layer.wo(weights.act(layer.wi[0](x)) * layer.wi[1](x))
    return layer.wo(weights.act(layer.wi[0](x)))


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
    h = weights.num_heads
    src_mask, tgt_mask = batch["attention_mask"], batch["decoder_attention_mask"]
    attentions = empty_attentions(KINDS)

    def sublayer(kind: str, index: int, att: Attention, x, memory, mask) -> torch.Tensor:
        probs, v = _attend(att, x, memory, mask, h)  # (B, H, Q, K), (B, H, K, D)
        hand_over(kind, index, probs, keep_layers, attentions, on_layer)
        return _merge(att, probs, v, layer_gates(head_gates, kind, index))  # (B, Q, hidden)

    # Encoder: the bias is computed once (first layer's table) and added in every layer; the
    # padding mask is summed into it, as T5Stack does with its shared position_bias.
    x = F.embedding(batch["input_ids"], weights.embed)  # T5 does not scale its embeddings
    s = x.shape[1]
    enc_mask = padding_mask(src_mask, x.dtype)  # (B, 1, 1, S)
    enc_bias = position_bias(weights, weights.encoder, s, s, x.device) + enc_mask  # (B, H, S, S)
    for index, layer in enumerate(weights.encoder.layers):
        normed = layer.self_norm(x)  # pre-norm: queries, keys and values all from norm(x)
        x = x + sublayer("self", index, layer.self_attn, normed, normed, enc_bias)  # attention (B, H, S, S)
        x = x + _ff(weights, layer, layer.ff_norm(x))
    memory = weights.encoder.final_norm(x)  # (B, S, hidden)

    y = F.embedding(batch["decoder_input_ids"], weights.decoder_embed)
    t = y.shape[1]
    dec_mask = causal_mask(t, y.dtype, y.device) + padding_mask(tgt_mask, y.dtype)  # (B, 1, T, T)
    dec_mask = dec_mask.clamp(min=torch.finfo(y.dtype).min)  # two blocked terms must not overflow
    dec_bias = position_bias(weights, weights.decoder, t, t, y.device) + dec_mask  # (B, H, T, T)
    for index, layer in enumerate(weights.decoder.layers):
        normed = layer.self_norm(y)
        y = y + sublayer("decoder", index, layer.self_attn, normed, normed, dec_bias)  # attention (B, H, T, T)
        # Cross-attention has no position bias: only the source padding mask.
        y = y + sublayer("cross", index, layer.cross_attn, layer.cross_norm(y), memory, enc_mask)  # (B, H, T, S)
        y = y + _ff(weights, layer, layer.ff_norm(y))
    return Output(hidden=weights.decoder.final_norm(y), attentions=attentions, encoder_hidden=memory)
