"""Math: our activation table (attnpipe/models/activations.py) is transformers' ACT2FN, bit for bit."""

import pytest
import torch
from transformers.activations import ACT2FN

from attnpipe.models.activations import ACTIVATIONS, activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_equals_act2fn(name):
    torch.manual_seed(0)
    x = torch.cat([torch.randn(4096) * 4, torch.tensor([0.0, -0.0, 1e-8, -30.0, 30.0, float("inf"), -float("inf")])])
    ours, theirs = activation(name)(x), ACT2FN[name](x)
    assert torch.equal(ours, theirs) or torch.equal(torch.nan_to_num(ours), torch.nan_to_num(theirs))
    assert ours.dtype == theirs.dtype


def test_a_name_outside_the_table_is_transformers_own():
    assert "mish" not in ACTIVATIONS
    x = torch.randn(64)
    assert torch.equal(activation("mish")(x), ACT2FN["mish"](x))
    with pytest.raises(KeyError):
        activation("no-such-activation")
