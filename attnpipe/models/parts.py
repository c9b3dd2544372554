"""What the family files share: small weight containers, the Output every forward returns, and the
hand-over of each layer's attention (streaming, kept layers, head gates). No forward logic lives here."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

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


def linear(module: torch.nn.Module) -> Linear:
    bias = getattr(module, "bias", None)
    return Linear(module.weight.detach(), None if bias is None else bias.detach())


def layer_norm(module: torch.nn.LayerNorm) -> LayerNorm:
    return LayerNorm(module.weight.detach(), module.bias.detach(), module.eps)


Kind = Literal["self", "decoder", "cross"]  # encoder / decoder-only self-attention, decoder self, decoder -> encoder
OnLayer = Callable[[str, int, torch.Tensor], None]  # on_layer(kind, layer, (B, H, Q, K) probabilities)


@dataclass(frozen=True)
class Output:
    """What every family's `forward` returns."""

    # (B, T, E) after the last stack (the decoder's for encoder-decoders), final norm included; None when
    # the caller asked for the attention only (forward(hidden=False)) and the pass stopped early
    hidden: torch.Tensor | None
    attentions: dict[str, dict[int, torch.Tensor]]  # kind -> layer -> (B, H, Q, K): kept layers not handed to on_layer
    encoder_hidden: torch.Tensor | None = None  # (B, S, E) after the encoder (encoder-decoders only)


def empty_attentions(kinds: tuple[str, ...]) -> dict[str, dict[int, torch.Tensor]]:
    return {kind: {} for kind in kinds}


def hand_over(
    kind: str,
    index: int,
    probs: torch.Tensor,  # (B, H, Q, K)
    keep_layers: Mapping[str, frozenset[int]] | None,
    attentions: dict[str, dict[int, torch.Tensor]],
    on_layer: OnLayer | None,
) -> None:
    """A kept layer's probabilities go to `on_layer` (streaming) or into `attentions[kind]`.

    A kind missing from `keep_layers` (or keep_layers None) keeps every layer.
    """
    keep = None if keep_layers is None else keep_layers.get(kind)
    if keep is not None and index not in keep:
        return
    if on_layer is not None:  # streaming: hand the layer over instead of keeping it
        on_layer(kind, index, probs)
    else:
        attentions[kind][index] = probs


def last_layer(keep_layers: Mapping[str, frozenset[int]] | None, kind: str, num_layers: int, hidden: bool) -> int:
    """The last layer of `kind` a forward pass must run: every layer when the hidden state is
    wanted (or no layer is kept: the pass then runs whole and returns its hidden state), else the
    last kept one (what follows it feeds only the hidden state)."""
    keep = None if keep_layers is None else keep_layers.get(kind)
    if hidden or keep is None:
        return num_layers - 1
    return max((index for index in keep if index < num_layers), default=num_layers - 1)


def layer_gates(
    head_gates: Mapping[str, torch.Tensor] | None, kind: str, index: int
) -> torch.Tensor | None:
    """Layer `index`'s gates of `kind`: (H,) or per text (B, H) from (L, H) / (L, B, H); None = no gating."""
    if head_gates is None or kind not in head_gates:
        return None
    return head_gates[kind][index]


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
        if self.index is not None:  # in place (index_copy_): no second (B·T, E) buffer to allocate and fill
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy_(0, self.index, x)
        return x.view(self.batch, self.length, x.shape[-1])


def layer_matrix_values(weights) -> int | None:
    """The values of one (the first) layer's weight matrices, every 2-D tensor in it: what each
    token costs in matrix products per layer. None when the weights have no `layers` (or
    `encoder.layers`) to look at (--method hf's HFWeights)."""
    layers = getattr(getattr(weights, "encoder", weights), "layers", None)
    return _matrix_values(layers[0]) if layers else None


def _matrix_values(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() if obj.dim() == 2 else 0
    if isinstance(obj, torch.nn.Module):
        return sum(p.numel() for p in obj.parameters() if p.dim() == 2)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return sum(_matrix_values(getattr(obj, field.name)) for field in dataclasses.fields(obj))
    if isinstance(obj, (list, tuple)):
        return sum(map(_matrix_values, obj))
    return 0
