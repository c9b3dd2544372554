"""GPT-2: a causal, pre-norm decoder with learned absolute positions.

    a = x + W_proj · attention(LayerNorm_1(x))        causal self-attention
    y = a + W_2 · gelu(W_1 · LayerNorm_2(a))          feed-forward
    final LayerNorm_f after the last block
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
from attnpipe.models.parts import (
    LayerNorm, Linear, OnLayer, Output, Packing, empty_attentions, hand_over, last_layer, layer_gates,
    layer_norm,
)

MODEL_TYPES = ("gpt2",)
INPUT_KIND = "text"
CAUSAL = True
KINDS = ("self",)
WORD_EMBEDDINGS = "wte"  # Weights.wte: (vocab, E), before the position embeddings


@dataclass(frozen=True)
class Block:
    ln_1: LayerNorm
    qkv: Linear  # fused query, key, value: hidden -> 3·hidden
    proj: Linear
    ln_2: LayerNorm
    fc: Linear
    fc_proj: Linear
    scale: float  # 1/√d, further divided by (layer + 1) with scale_attn_by_inverse_layer_idx


@dataclass(frozen=True)
class Weights:
    wte: torch.Tensor  # (vocab, hidden)
    wpe: torch.Tensor  # (positions, hidden)
    layers: tuple[Block, ...]
    ln_f: LayerNorm
    act: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    token_type: None = None  # GPT-2 takes no token types

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _conv1d(module) -> Linear:
    # transformers' Conv1D stores weight as (in, out), the transpose of nn.Linear's (out, in).
    return Linear(module.weight.detach().t(), module.bias.detach())


def load_weights(model) -> Weights:
    config = model.config
    head_dim = config.n_embd // config.n_head
    blocks = []
    for index, block in enumerate(model.h):
        scale = 1.0 / math.sqrt(head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= float(index + 1)
        blocks.append(Block(
            ln_1=layer_norm(block.ln_1),
            qkv=_conv1d(block.attn.c_attn),
            proj=_conv1d(block.attn.c_proj),
            ln_2=layer_norm(block.ln_2),
            fc=_conv1d(block.mlp.c_fc),
            fc_proj=_conv1d(block.mlp.c_proj),
            scale=scale,
        ))
    return Weights(
        wte=model.wte.weight.detach(),
        wpe=model.wpe.weight.detach(),
        layers=tuple(blocks),
        ln_f=layer_norm(model.ln_f),
        act=activation(config.activation_function),
        num_heads=config.n_head,
    )


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
    b, t = input_ids.shape
    positions = torch.arange(t, device=input_ids.device)  # right padding: real tokens start at 0
    packing = Packing.of(attention_mask)  # token-wise parts on the real tokens only
    x = packing.pack(F.embedding(input_ids, weights.wte) + F.embedding(positions, weights.wpe)[None])  # (N, E)
    mask = causal_mask(t, x.dtype, x.device) + padding_mask(attention_mask, x.dtype)  # (B, 1, Q, K)
    mask = mask.clamp(min=torch.finfo(x.dtype).min)  # two blocked terms must not overflow to -inf
    attentions = empty_attentions(KINDS)
    last = last_layer(keep_layers, "self", len(weights.layers), hidden)
    for index, block in enumerate(weights.layers[: last + 1]):
        q, k, v = packing.unpack(block.qkv(block.ln_1(x))).split(x.shape[-1], dim=-1)  # 3 x (B, T, hidden)
        q, k, v = (split_heads(z, weights.num_heads) for z in (q, k, v))  # (B, H, T, D)
        probs = attention_probs(q, k, block.scale, mask)  # (B, H, Q, K)
        hand_over("self", index, probs, keep_layers, attentions, on_layer)
        if index == last and not hidden:  # the rest of the pass feeds only the hidden state
            return Output(hidden=None, attentions=attentions)
        context = head_context(probs, v, layer_gates(head_gates, "self", index))  # (B, H, Q, D)
        x = x + block.proj(packing.pack(merge_heads(context)))
        del probs  # free this layer's (B, H, T, T) before the next one is computed
        x = x + block.fc_proj(weights.act(block.fc(block.ln_2(x))))
    return Output(hidden=packing.unpack(weights.ln_f(x)), attentions=attentions)
