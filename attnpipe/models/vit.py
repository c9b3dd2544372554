"""ViT (Dosovitskiy et al. 2021): an image cut into patches, a [CLS] token, a pre-norm encoder.

    x_0 = [cls; W_p · patch_1; ...; W_p · patch_N] + position      patch embedding
    a   = x + W_o · attention(LayerNorm_before(x))                   attention sub-layer
    y   = a + W_2 · gelu(W_1 · LayerNorm_after(a))                   feed-forward sub-layer
    final LayerNorm after the last layer

Tokens are [CLS] then the patches in row-major order (row 0 left to right, then row 1, ...),
the order of transformers' `Conv2d(...).flatten(2)`. No padding: every image is resized to the
model's image size by its processor, so every sequence has 1 + rows·cols tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from attnpipe.models.activations import activation

from attnpipe.attention import attention_probs, head_context, merge_heads, split_heads
from attnpipe.models.parts import (
    LayerNorm, Linear, OnLayer, Output, empty_attentions, hand_over, last_layer, layer_gates, layer_norm,
    linear,
)

MODEL_TYPES = ("vit",)
INPUT_KIND = "image"
CAUSAL = False
KINDS = ("self",)
WORD_EMBEDDINGS = None  # pixels, not token ids: gradient x input is taken on embed()'s output (inputs_embeds)


@dataclass(frozen=True)
class Layer:
    norm_before: LayerNorm
    query: Linear
    key: Linear
    value: Linear
    out: Linear
    norm_after: LayerNorm
    fc1: Linear
    fc2: Linear


@dataclass(frozen=True)
class Weights:
    patch: Linear  # the patch Conv2d as a linear map: (hidden, C·p·p) over flattened patches
    patch_size: int
    image_size: tuple[int, int]  # (height, width) the position embeddings were trained for
    num_channels: int
    cls: torch.Tensor  # (hidden,)
    position: torch.Tensor  # (1 + rows·cols, hidden)
    layers: tuple[Layer, ...]
    norm: LayerNorm
    act: Callable[[torch.Tensor], torch.Tensor]
    num_heads: int
    token_type: None = None  # images have no token types

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patches."""
        return self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def load_weights(model) -> Weights:
    """Read a transformers ViTModel (base model, no classifier head) into `Weights`."""
    config = model.config
    patch_h, patch_w = _pair(config.patch_size)
    if patch_h != patch_w:
        raise ValueError(f"non-square patches ({patch_h}x{patch_w}) are not supported")
    conv = model.embeddings.patch_embeddings.projection  # Conv2d(C, hidden, kernel=p, stride=p)
    layers = tuple(
        Layer(
            norm_before=layer_norm(layer.layernorm_before),
            query=linear(layer.attention.q_proj),
            key=linear(layer.attention.k_proj),
            value=linear(layer.attention.v_proj),
            out=linear(layer.attention.o_proj),
            norm_after=layer_norm(layer.layernorm_after),
            fc1=linear(layer.mlp.fc1),
            fc2=linear(layer.mlp.fc2),
        )
        for layer in model.layers
    )
    return Weights(
        # A stride-p, kernel-p convolution is one linear map applied to each flattened patch.
        patch=Linear(conv.weight.detach().flatten(1), conv.bias.detach()),  # (hidden, C·p·p)
        patch_size=patch_h,
        image_size=_pair(config.image_size),
        num_channels=config.num_channels,
        cls=model.embeddings.cls_token.detach()[0, 0],
        position=model.embeddings.position_embeddings.detach()[0],
        layers=layers,
        norm=layer_norm(model.layernorm),
        act=activation(config.hidden_act),
        num_heads=config.num_attention_heads,
    )


def patches(pixel_values: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, rows·cols, C·p·p): each patch flattened channel-first, patches row-major.

    The flattening order (C, p_row, p_col) matches Conv2d's weight layout (out, C, p, p).
    """
    b, c, h, w = pixel_values.shape
    x = pixel_values.reshape(b, c, h // p, p, w // p, p)  # (B, C, rows, p, cols, p)
    x = x.permute(0, 2, 4, 1, 3, 5)  # (B, rows, cols, C, p, p)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def embed(weights: Weights, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch embeddings with [CLS] prepended, plus positions: (B, 1 + rows·cols, hidden)."""
    b, c, h, w = pixel_values.shape
    if (h, w) != weights.image_size:
        raise ValueError(f"image of {h}x{w} pixels, but the model takes {weights.image_size[0]}x"
                         f"{weights.image_size[1]} (position embeddings are not interpolated)")
    if c != weights.num_channels:
        raise ValueError(f"image has {c} channels, the model takes {weights.num_channels}")
    x = weights.patch(patches(pixel_values, weights.patch_size))  # (B, N, hidden)
    cls = weights.cls.expand(b, 1, -1)  # (B, 1, hidden)
    return torch.cat([cls, x], dim=1) + weights.position  # (B, 1 + N, hidden)


def forward(
    weights: Weights,
    batch: Mapping[str, torch.Tensor],  # pixel_values (B, C, H, W), as the model's image processor makes them
    *,
    keep_layers: Mapping[str, frozenset[int]] | None = None,
    head_gates: Mapping[str, torch.Tensor] | None = None,  # "self": (L, H) or (L, B, H) multipliers
    on_layer: OnLayer | None = None,
    hidden: bool = True,  # False: the attention only (the pass may stop after the last kept layer)
) -> Output:
    """Run the encoder; return the final (normed) hidden state and the kept layers' attention.

    `inputs_embeds` (B, T, hidden) in place of pixel_values is what the first layer receives,
    `embed(weights, pixel_values)` ([CLS] + patches + positions): gradient x input differentiates it.
    """
    x = batch["inputs_embeds"] if "inputs_embeds" in batch else embed(weights, batch["pixel_values"])  # (B, T, hidden)
    attentions = empty_attentions(KINDS)
    last = last_layer(keep_layers, "self", len(weights.layers), hidden)
    for index, layer in enumerate(weights.layers[: last + 1]):
        h = layer.norm_before(x)  # pre-norm: attention reads the normalised stream
        q = split_heads(layer.query(h), weights.num_heads)  # (B, H, T, D)
        k = split_heads(layer.key(h), weights.num_heads)  # (B, H, T, D)
        probs = attention_probs(q, k, 1.0 / math.sqrt(q.shape[-1]))  # (B, H, T, T); no padding
        hand_over("self", index, probs, keep_layers, attentions, on_layer)
        if index == last and not hidden:  # the rest of the pass feeds only the hidden state
            return Output(hidden=None, attentions=attentions)
        v = split_heads(layer.value(h), weights.num_heads)  # (B, H, T, D)
        x = x + layer.out(merge_heads(head_context(probs, v, layer_gates(head_gates, "self", index))))
        del probs
        x = x + layer.fc2(weights.act(layer.fc1(layer.norm_after(x))))
    return Output(hidden=weights.norm(x), attentions=attentions)
