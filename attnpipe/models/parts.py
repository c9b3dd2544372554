"""Small weight containers shared by the family files (no forward logic lives here)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Linear:
    weight: torch.Tensor  # (out, in), as torch.nn.Linear stores it
    bias: torch.Tensor | None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class LayerNorm:
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


@dataclass(frozen=True)
class Output:
    hidden: torch.Tensor  # (B, T, hidden) after the last layer (and final norm, if any)
    attentions: dict[int, torch.Tensor]  # layer -> (B, H, Q, K) probabilities, kept layers only


def linear(module: torch.nn.Module) -> Linear:
    bias = getattr(module, "bias", None)
    return Linear(module.weight.detach(), None if bias is None else bias.detach())


def layer_norm(module: torch.nn.LayerNorm) -> LayerNorm:
    return LayerNorm(module.weight.detach(), module.bias.detach(), module.eps)


@dataclass(frozen=True)
class Seq2SeqOutput:
    """What an encoder-decoder family's `forward_seq2seq` returns (kept layers only)."""

    encoder_hidden: torch.Tensor  # (B, S, hidden) after the encoder's last layer (and final norm)
    decoder_hidden: torch.Tensor  # (B, T, hidden) after the decoder's last layer (and final norm)
    encoder_attentions: dict[int, torch.Tensor]  # encoder layer -> (B, H, S, S) self-attention
    decoder_attentions: dict[int, torch.Tensor]  # decoder layer -> (B, H, T, T) causal self-attention
    cross_attentions: dict[int, torch.Tensor]  # decoder layer -> (B, H, T, S) decoder -> encoder


def hand_over(index: int, probs: torch.Tensor, keep_layers, attentions: dict, on_layer) -> None:
    """A kept layer's (B, H, Q, K) probabilities go to `on_layer` (streaming) or into `attentions`."""
    if keep_layers is not None and index not in keep_layers:
        return
    if on_layer is not None:  # streaming: hand the layer over instead of keeping it
        on_layer(index, probs)
    else:
        attentions[index] = probs


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a right- or left-padded (B, T) batch are, to skip the padding.

    Everything in a layer but attention works token by token, so the family forwards run their
    linear layers, norms and activations on the N real tokens as one (N, ·) matrix and lay the
    tokens out as (B, T, ·) only for attention. Texts of different lengths in one batch then cost
    no compute for their padding: a third of the tokens of the demo corpus in length-sorted
    batches of 32, and most of a layer's time is its linear layers.
    """

    index: torch.Tensor | None  # (N,) flat positions b·T + t of the real tokens; None: no padding
    batch: int
    length: int

    @classmethod
    def of(cls, attention_mask: torch.Tensor) -> Packing:  # (B, T), 1 = real token
        b, t = attention_mask.shape
        real = attention_mask.reshape(-1) != 0
        index = None if bool(real.all()) else real.nonzero().squeeze(1)
        return cls(index, b, t)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, E) -> (N, E): the real tokens, in batch order."""
        flat = x.reshape(self.batch * self.length, x.shape[-1])
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) -> (B, T, E), zeros at the padded positions."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x)
        return x.view(self.batch, self.length, x.shape[-1])
