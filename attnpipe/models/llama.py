"""The Llama family: Llama, Mistral, Qwen2. Causal, pre-norm (RMSNorm), rotary positions,
grouped-query attention, SwiGLU feed-forward.

    a = x + W_o · attention(RoPE(q), RoPE(k), v)   over RMSNorm_in(x), causal (+ sliding window)
    y = a + W_down · (silu(W_gate · h) ⊙ W_up · h),  h = RMSNorm_post(a)
    final RMSNorm after the last layer

With grouped-query attention several query heads share one key/value head; attention is
computed and stored per *query* head.
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
    Linear, OnLayer, Output, Packing, empty_attentions, hand_over, last_layer, layer_gates, linear,
)

MODEL_TYPES = ("llama", "mistral", "qwen2")
INPUT_KIND = "text"
CAUSAL = True
KINDS = ("self",)
WORD_EMBEDDINGS = "embed"  # Weights.embed: (vocab, E); positions enter as RoPE inside attention


@dataclass(frozen=True)
class RMSNorm:
    weight: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # transformers normalises in float32 and scales after casting back (LlamaRMSNorm).
        # (float64 stays float64, for the gradient checks)
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        variance = wide.pow(2).mean(-1, keepdim=True)
        return self.weight * (wide * torch.rsqrt(variance + self.eps)).to(x.dtype)


@dataclass(frozen=True)
class Layer:
    norm_in: RMSNorm
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    norm_post: RMSNorm
    gate: Linear
    up: Linear
    down: Linear
    window: int | None  # sliding-window size for this layer, None = full causal attention


@dataclass(frozen=True)
class Weights:
    embed: torch.Tensor  # (vocab, hidden)
    layers: tuple[Layer, ...]
    norm: RMSNorm
    act: Callable[[torch.Tensor], torch.Tensor]
    inv_freq: torch.Tensor  # (head_dim / 2,) rotary frequencies, with the config's rope scaling
    rope_scale: float  # transformers' attention_scaling applied to cos and sin (1.0 by default)
    num_heads: int
    num_kv_heads: int
    head_dim: int
    token_type: None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _rms(module) -> RMSNorm:
    return RMSNorm(module.weight.detach(), module.variance_epsilon)


def _window(config, index: int) -> int | None:
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Qwen2 (and newer configs) name each layer's kind
        return config.sliding_window if layer_types[index] == "sliding_attention" else None
    return getattr(config, "sliding_window", None)  # Mistral: every layer when set


def load_weights(model) -> Weights:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layers = tuple(
        Layer(
            norm_in=_rms(layer.input_layernorm),
            q=linear(layer.self_attn.q_proj),
            k=linear(layer.self_attn.k_proj),
            v=linear(layer.self_attn.v_proj),
            o=linear(layer.self_attn.o_proj),
            norm_post=_rms(layer.post_attention_layernorm),
            gate=linear(layer.mlp.gate_proj),
            up=linear(layer.mlp.up_proj),
            down=linear(layer.mlp.down_proj),
            window=_window(config, index),
        )
        for index, layer in enumerate(model.layers)
    )
    return Weights(
        embed=model.embed_tokens.weight.detach(),
        layers=layers,
        norm=_rms(model.norm),
        act=activation(config.hidden_act),
        # The frequencies come from the loaded rotary module, so rope_scaling variants
        # (linear, dynamic, llama3, yarn) are whatever transformers initialised for this config.
        inv_freq=model.rotary_emb.inv_freq.detach().float(),
        rope_scale=float(model.rotary_emb.attention_scaling),
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=head_dim,
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rope(weights: Weights, length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    positions = torch.arange(length, device=device, dtype=torch.float32)  # right padding
    freqs = positions[:, None] * weights.inv_freq.to(device)[None, :]  # (T, D/2)
    angles = torch.cat((freqs, freqs), dim=-1)  # (T, D): the two halves rotate together
    cos = (angles.cos() * weights.rope_scale).to(dtype)[None, None]  # (1, 1, T, D)
    sin = (angles.sin() * weights.rope_scale).to(dtype)[None, None]
    return cos, sin


def forward(
    weights: Weights,
    batch: Mapping[str, torch.Tensor],  # input_ids (B, T), attention_mask (B, T); right-padded
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,
    head_gates: Mapping[str, torch.Tensor] | None = None,  # "self": (L, H) or (L, B, H) multipliers
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # False: the attention only (the pass may stop after the last kept layer)
) -> Output:
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    t = input_ids.shape[1]
    packing = Packing.of(attention_mask)  # token-wise parts on the real tokens only
    x = packing.pack(F.embedding(input_ids, weights.embed))  # (N, hidden)
    cos, sin = _rope(weights, t, x.device, x.dtype)
    pad = padding_mask(attention_mask, x.dtype)  # (B, 1, 1, K)
    lowest = torch.finfo(x.dtype).min
    masks = {  # one additive mask per distinct window size
        window: (causal_mask(t, x.dtype, x.device, window) + pad).clamp(min=lowest)
        for window in {layer.window for layer in weights.layers}
    }
    group = weights.num_heads // weights.num_kv_heads
    attentions = empty_attentions(KINDS)
    last = last_layer(keep_layers, "self", len(weights.layers), hidden)
    for index, layer in enumerate(weights.layers[: last + 1]):
        h = layer.norm_in(x)
        q = split_heads(packing.unpack(layer.q(h)), weights.num_heads)  # (B, H, T, D)
        k = split_heads(packing.unpack(layer.k(h)), weights.num_kv_heads)  # (B, H_kv, T, D)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        # GQA: query head i uses key/value head i // group, so repeat each K/V head `group` times.
        k = k.repeat_interleave(group, dim=1)  # (B, H, T, D)
        probs = attention_probs(q, k, weights.head_dim**-0.5, masks[layer.window])  # (B, H, Q, K)
        hand_over("self", index, probs, keep_layers, attentions, on_layer)
        if index == last and not hidden:  # the rest of the pass feeds only the hidden state
            return Output(hidden=None, attentions=attentions)
        v = split_heads(packing.unpack(layer.v(h)), weights.num_kv_heads)  # (B, H_kv, T, D)
        v = v.repeat_interleave(group, dim=1)
        context = head_context(probs, v, layer_gates(head_gates, "self", index))  # (B, H, Q, D)
        x = x + layer.o(packing.pack(merge_heads(context)))
        del probs  # free this layer's (B, H, T, T) before the next one is computed
        h = layer.norm_post(x)
        x = x + layer.down(weights.act(layer.gate(h)) * layer.up(h))
    return Output(hidden=packing.unpack(weights.norm(x)), attentions=attentions)
