"""Plain PyTorch encoders: a stack of `torch.nn.TransformerEncoderLayer` (seeds 000 and 003).

Each layer is one of the two layouts `nn.TransformerEncoderLayer` offers:

    post-norm (norm_first=False, torch's default):
        a = norm1(x + W_o · attention(x))
        y = norm2(a + W_2 · act(W_1 · a))
    pre-norm (norm_first=True):
        a = x + W_o · attention(norm1(x))
        y = a + W_2 · act(W_1 · norm2(a))

then the `nn.TransformerEncoder`'s final `norm`, when it has one. `nn.MultiheadAttention` keeps
query, key and value in one packed `in_proj_weight` (3E, E); we split it and compute every
head's probabilities with the shared primitive, instead of the head average that
`nn.MultiheadAttention` returns by default. `batch_first` only decides how the module itself
takes its input: our pass always works on (B, T, E). Dropout is not applied (inference).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from attnpipe.attention import (
    attention_probs, causal_mask, head_context, merge_heads, padding_mask, split_heads,
)
from attnpipe.models.parts import (
    LayerNorm, Linear, OnLayer, Output, empty_attentions, hand_over, last_layer, layer_gates, linear,
)

MODEL_TYPES = ("torch",)
INPUT_KIND = "embeddings"
CAUSAL = False  # a run's --causal is carried by Weights.causal
KINDS = ("self",)
WORD_EMBEDDINGS = None  # the inputs are embeddings already: gradient x input is taken on inputs_embeds


@dataclass(frozen=True)
class Layer:
    qkv: Linear  # packed in_proj: E -> 3E, query rows first, then key, then value
    out: Linear
    norm1: LayerNorm
    norm2: LayerNorm
    ff_in: Linear
    ff_out: Linear
    act: Callable[[torch.Tensor], torch.Tensor]  # the layer's own activation (relu, gelu, or a module)
    norm_first: bool


@dataclass(frozen=True)
class Weights:
    layers: tuple[Layer, ...]
    final_norm: LayerNorm | None  # nn.TransformerEncoder(norm=...)
    num_heads: int
    d_model: int
    batch_first: bool  # how the user's module takes input (recorded; our pass is always (B, T, E))
    causal: bool = False  # queries see only earlier keys (--causal: the mask the user's model is run with)
    token_type: None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def find_encoder_layers(module: nn.Module) -> tuple[list[nn.TransformerEncoderLayer], nn.Module | None]:
    """The encoder layers of `module` in forward order, and the final norm if they sit in an encoder.

    The first `nn.TransformerEncoder` found is used (its `layers`, its `norm`); without one,
    every `nn.TransformerEncoderLayer` in registration order, with no final norm.
    """
    for sub in module.modules():
        if isinstance(sub, nn.TransformerEncoder):
            return list(sub.layers), sub.norm
    return [sub for sub in module.modules() if isinstance(sub, nn.TransformerEncoderLayer)], None


def _norm(module: nn.Module) -> LayerNorm:
    if not isinstance(module, nn.LayerNorm) or module.weight is None:
        raise ValueError(f"norm layers must be nn.LayerNorm with weights, found {module!r}")
    bias = None if module.bias is None else module.bias.detach()  # bias=False layers have none
    return LayerNorm(module.weight.detach(), bias, module.eps)


def _layer(layer: nn.TransformerEncoderLayer) -> Layer:
    attn = layer.self_attn
    if not attn._qkv_same_embed_dim:  # encoder layers always have kdim == vdim == embed_dim
        raise ValueError("self-attention with separate kdim/vdim is not supported")
    bias = attn.in_proj_bias
    return Layer(
        qkv=Linear(attn.in_proj_weight.detach(), None if bias is None else bias.detach()),
        out=linear(attn.out_proj),
        norm1=_norm(layer.norm1),
        norm2=_norm(layer.norm2),
        ff_in=linear(layer.linear1),
        ff_out=linear(layer.linear2),
        act=layer.activation,
        norm_first=layer.norm_first,
    )


def load_weights(module: nn.Module, *, causal: bool = False) -> Weights:
    """Map the encoder layers of a user's module; ValueError when it has none or mixes sizes."""
    layers, final_norm = find_encoder_layers(module)
    if not layers:
        raise ValueError("the module holds no nn.TransformerEncoder or nn.TransformerEncoderLayer")
    heads = {layer.self_attn.num_heads for layer in layers}
    dims = {layer.self_attn.embed_dim for layer in layers}
    if len(heads) != 1 or len(dims) != 1:
        raise ValueError(f"encoder layers differ in heads {sorted(heads)} or width {sorted(dims)}")
    return Weights(
        layers=tuple(_layer(layer) for layer in layers),
        final_norm=None if final_norm is None else _norm(final_norm),
        num_heads=heads.pop(),
        d_model=dims.pop(),
        batch_first=bool(layers[0].self_attn.batch_first),
        causal=causal,
    )


def _attend(layer: Layer, x: torch.Tensor, num_heads: int, mask: torch.Tensor | None, gates, index: int,
            keep_layers, attentions, on_layer) -> torch.Tensor:
    """Self-attention on (B, T, E): hands the (B, H, Q, K) probabilities over, returns (B, T, E)."""
    q, k, v = layer.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, E): in_proj_weight stacks W_q, W_k, W_v
    q, k, v = (split_heads(z, num_heads) for z in (q, k, v))  # (B, H, T, D)
    probs = attention_probs(q, k, 1.0 / math.sqrt(q.shape[-1]), mask)  # (B, H, Q, K)
    hand_over("self", index, probs, keep_layers, attentions, on_layer)
    return layer.out(merge_heads(head_context(probs, v, gates)))


def forward(
    weights: Weights,
    batch: Mapping[str, torch.Tensor],  # inputs_embeds (B, T, E): the first layer's input; [attention_mask (B, T)]
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,
    head_gates: Mapping[str, torch.Tensor] | None = None,  # "self": (L, H) or (L, B, H) multipliers
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # False: the attention only (the pass may stop after the last kept layer)
) -> Output:
    """The encoder on given embeddings; causal when `weights.causal` (a run's --causal, as the
    `is_causal` / square causal `mask` a user passes to nn.TransformerEncoder)."""
    x = batch["inputs_embeds"]
    attention_mask = batch.get("attention_mask")  # 1 = real, 0 = padding (src_key_padding_mask inverted)
    mask = None
    if attention_mask is not None:
        mask = padding_mask(attention_mask, x.dtype)  # (B, 1, 1, K)
    if weights.causal:
        blocked = causal_mask(x.shape[1], x.dtype, x.device)  # (1, 1, Q, K)
        mask = blocked if mask is None else (mask + blocked).clamp(min=torch.finfo(x.dtype).min)
    attentions = empty_attentions(KINDS)
    kept = dict(keep_layers=keep_layers, attentions=attentions, on_layer=on_layer)
    last = last_layer(keep_layers, "self", len(weights.layers), hidden)
    for index, layer in enumerate(weights.layers[: last + 1]):
        gates = layer_gates(head_gates, "self", index)
        if index == last and not hidden:  # the attention only: what follows it feeds only the hidden state
            _attend(layer, layer.norm1(x) if layer.norm_first else x, weights.num_heads, mask, gates, index, **kept)
            return Output(hidden=None, attentions=attentions)
        if layer.norm_first:
            x = x + _attend(layer, layer.norm1(x), weights.num_heads, mask, gates, index, **kept)
            x = x + layer.ff_out(layer.act(layer.ff_in(layer.norm2(x))))
        else:
            x = layer.norm1(x + _attend(layer, x, weights.num_heads, mask, gates, index, **kept))
            x = layer.norm2(x + layer.ff_out(layer.act(layer.ff_in(x))))
    hidden = x if weights.final_norm is None else weights.final_norm(x)
    return Output(hidden=hidden, attentions=attentions)
