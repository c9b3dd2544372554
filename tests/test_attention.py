"""The attention primitive on hand-computed cases."""

import math

import torch

from attnpipe.attention import attention_probs, merge_heads, padding_mask, split_heads


def test_probs_match_hand_computed_softmax():
    q = torch.tensor([[[[1.0, 0.0]]]])  # (B=1, H=1, Q=1, D=2)
    k = torch.tensor([[[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]]]])  # (1, 1, K=3, 2)
    scale = 1 / math.sqrt(2)
    probs = attention_probs(q, k, scale)
    logits = torch.tensor([1.0, 0.0, 2.0]) * scale
    expected = torch.exp(logits) / torch.exp(logits).sum()
    torch.testing.assert_close(probs[0, 0, 0], expected, rtol=0, atol=1e-7)


def test_padded_keys_get_exactly_zero_and_rows_sum_to_one():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    probs = attention_probs(q, k, 0.5, padding_mask(mask, q.dtype))
    assert torch.all(probs[1, :, :, 3:] == 0)
    assert torch.all(probs[0] > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5), rtol=0, atol=1e-6)


def test_split_and_merge_heads_are_inverse_and_keep_head_blocks():
    x = torch.arange(2 * 3 * 8, dtype=torch.float32).view(2, 3, 8)  # (B, T, H·D) with H=4, D=2
    heads = split_heads(x, 4)
    assert heads.shape == (2, 4, 3, 2)
    torch.testing.assert_close(heads[:, 1], x[:, :, 2:4])  # head 1 owns features 2..3
    torch.testing.assert_close(merge_heads(heads), x)
