"""The feed-forward activations by config name, without importing transformers.

`activation(name)` is the function transformers' `ACT2FN[name]` computes (transformers/activations.py),
written out for the names our families' configs use, so that loading a model does not import
transformers (~2 s). tests/test_activations.py checks each one equal to ACT2FN bit for bit. A name
not in the table is looked up in transformers' ACT2FN itself, so any config still gets the exact function.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

Activation = Callable[[torch.Tensor], torch.Tensor]


def _tanh_gelu(x: torch.Tensor) -> torch.Tensor:
    # NewGELUActivation (GPT-2's "gelu_new"): the tanh approximation written as in the paper, not
    # F.gelu(approximate="tanh"), whose fused kernel rounds differently.
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def _fast_gelu(x: torch.Tensor) -> torch.Tensor:  # FastGELUActivation
    return 0.5 * x * (1.0 + torch.tanh(x * 0.7978845608 * (1.0 + 0.044715 * x * x)))


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:  # QuickGELUActivation (CLIP)
    return x * torch.sigmoid(1.702 * x)


def _python_gelu(x: torch.Tensor) -> torch.Tensor:  # GELUActivation(use_gelu_python=True)
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _accurate_gelu(x: torch.Tensor) -> torch.Tensor:  # AccurateGELUActivation
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _relu_squared(x: torch.Tensor) -> torch.Tensor:  # ReLUSquaredActivation
    return torch.square(F.relu(x))


def _identity(x: torch.Tensor) -> torch.Tensor:  # LinearActivation
    return x


ACTIVATIONS: dict[str, Activation] = {
    "gelu": F.gelu,  # GELUActivation: the exact erf GELU of BERT
    "gelu_new": _tanh_gelu,
    "gelu_python_tanh": _tanh_gelu,  # GELUTanh(use_gelu_tanh_python=True): the same formula
    "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),  # GELUTanh: torch's fused tanh GELU
    "gelu_fast": _fast_gelu,
    "gelu_python": _python_gelu,
    "gelu_accurate": _accurate_gelu,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu2": _relu_squared,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "linear": _identity,
}


def activation(name: str) -> Activation:
    """The activation a config names ("gelu", "gelu_new", "silu", ...), as transformers computes it."""
    if name in ACTIVATIONS:
        return ACTIVATIONS[name]
    from transformers.activations import ACT2FN  # a rare name: transformers' own module (KeyError if unknown)

    return ACT2FN[name]
