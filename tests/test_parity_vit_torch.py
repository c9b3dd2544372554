"""The specification for the ViT and plain-torch paths: our pass against the reference per head.

ViT: a tiny random ViT saved like a user's checkpoint and loaded by our loader, against
transformers' eager attention (probabilities <= 1e-5, last hidden state <= 1e-4).

Plain torch: `nn.TransformerEncoder`s, pre-norm and post-norm, batch_first True and False,
relu and gelu, with padding. Attention reference: each layer's own `nn.MultiheadAttention`
called with `need_weights=True, average_attn_weights=False` on the input that layer's attention
sees. Output reference: the module's own forward. Both in eval mode (no dropout). In eval mode
under no_grad/inference_mode torch may run `nn.TransformerEncoderLayer` on its "fast path" (a
fused kernel, and with a padding mask a nested tensor whose padded positions come back as 0);
it computes the same function with different rounding, so outputs are compared on real
positions at 1e-4. The attention reference never takes the fast path: asking for weights
(`need_weights=True`) forces the regular `multi_head_attention_forward`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from attnpipe.extract.loading import load_model
from attnpipe.models import torch_encoder, vit
from conftest import write_test_images

ATTN_TOL = 1e-5
HIDDEN_TOL = 1e-4


# ----------------------------------------------------------------------------- ViT


def test_tiny_vit_matches_transformers_eager(tiny_vit_dir, tmp_path):
    from PIL import Image

    model = load_model(tiny_vit_dir, torch.device("cpu"), input_kind="image")
    images = [Image.open(p).convert("RGB") for p in write_test_images(tmp_path)]
    pixels = model.processor(images=images, return_tensors="pt")["pixel_values"]  # (3, 3, 32, 32)
    with torch.inference_mode():
        ours = vit.forward(model.weights, {"pixel_values": pixels})
        ref = model.hf_model(pixel_values=pixels, output_attentions=True)
    assert len(ref.attentions) == model.weights.num_layers == 2, "reference returned no attentions"
    assert model.weights.grid == (4, 4)
    attn_diff = 0.0
    for layer, probs in ours.attentions["self"].items():
        assert probs.shape == (3, 4, 17, 17)  # [CLS] + 4x4 patches
        attn_diff = max(attn_diff, (probs - ref.attentions[layer]).abs().max().item())  # per head
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 4, 17), rtol=0, atol=1e-5)
    hidden_diff = (ours.hidden - ref.last_hidden_state).abs().max().item()
    print(f"ViT parity: attention {attn_diff:.2e}, hidden {hidden_diff:.2e}")
    assert attn_diff <= ATTN_TOL
    assert hidden_diff <= HIDDEN_TOL
    # Non-uniform attention (uniform would be 1/17), so a wrong scale or patch order would show.
    assert ours.attentions["self"][0].max().item() > 0.5


def test_patch_order_matches_the_convolution():
    """Token 1 + r·cols + c is patch (r, c): our flattening against Conv2d's own output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel_size=4, stride=4)
    pixels = torch.randn(2, 3, 8, 12)  # 2 x 3 patches
    expected = conv(pixels).flatten(2).transpose(1, 2)  # (B, rows·cols, 5), transformers' order
    ours = torch.nn.functional.linear(vit.patches(pixels, 4), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- plain torch

LENGTHS = [7, 5, 2]  # padded batch: real positions per sample


def make_encoder(norm_first: bool, batch_first: bool, activation: str, final_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=40, dropout=0.1, activation=activation,
                                       batch_first=batch_first, norm_first=norm_first)
    # Nested tensors need batch_first and post-norm; ask for them only where torch can use them.
    nested = batch_first and not norm_first
    encoder = nn.TransformerEncoder(layer, 3, norm=nn.LayerNorm(32) if final_norm else None,
                                    enable_nested_tensor=nested)
    return nn.Sequential(encoder).eval()  # the encoder inside a user's module, found by our walk


def module_reference(encoder: nn.TransformerEncoder, x: torch.Tensor, padding: torch.Tensor,
                     causal: torch.Tensor | None):
    """Per layer (B, H, Q, K) weights from each layer's own MultiheadAttention, and the output.

    x: (B, T, E); padding: (B, T) True = padded key (torch's src_key_padding_mask convention).
    """
    batch_first = encoder.layers[0].self_attn.batch_first
    h = x if batch_first else x.transpose(0, 1)  # the layout the module takes
    weights = []
    for layer in encoder.layers:
        attn_in = layer.norm1(h) if layer.norm_first else h  # what this layer's attention reads
        _, w = layer.self_attn(attn_in, attn_in, attn_in, key_padding_mask=padding, attn_mask=causal,
                               need_weights=True, average_attn_weights=False)  # (B, H, Q, K) per head
        weights.append(w)
        h = layer(h, src_mask=causal, src_key_padding_mask=padding)
    out = encoder(x if batch_first else x.transpose(0, 1), mask=causal, src_key_padding_mask=padding)
    if out.is_nested:  # the fast path's nested output: padded positions become 0
        out = out.to_padded_tensor(0.0, (x.shape[0], x.shape[1], x.shape[2]) if batch_first else None)
    return weights, out if batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_torch_encoder_matches_multihead_attention(norm_first, batch_first, causal):
    activation = "gelu" if norm_first == batch_first else "relu"  # both activations, both layouts
    module = make_encoder(norm_first, batch_first, activation, final_norm=norm_first)
    encoder = module[0]
    weights = torch_encoder.load_weights(module)
    assert weights.num_layers == 3 and weights.num_heads == 4 and weights.batch_first == batch_first
    assert (weights.final_norm is not None) == norm_first
    torch.manual_seed(1)
    x = torch.randn(len(LENGTHS), max(LENGTHS), 32)  # (B, T, E)
    real = torch.tensor([[1] * n + [0] * (max(LENGTHS) - n) for n in LENGTHS])  # (B, T)
    causal_mask = nn.Transformer.generate_square_subsequent_mask(max(LENGTHS)) if causal else None
    with torch.inference_mode():
        ours = torch_encoder.forward(dataclasses.replace(weights, causal=causal),
                                     {"inputs_embeds": x, "attention_mask": real})
        ref_weights, ref_out = module_reference(encoder, x, real == 0, causal_mask)
    attn_diff = hidden_diff = 0.0
    for layer, ref in enumerate(ref_weights):
        for row, n in enumerate(LENGTHS):
            mine = ours.attentions["self"][layer][row, :, :n, :n]  # (H, Q, K) on real positions
            assert mine.shape == ref[row, :, :n, :n].shape
            attn_diff = max(attn_diff, (mine - ref[row, :, :n, :n]).abs().max().item())
            assert torch.all(ours.attentions["self"][layer][row, :, :n, n:] == 0), "padded keys must get 0"
            if causal:
                assert torch.all(torch.triu(mine, diagonal=1) == 0), "future keys must get exactly 0"
    for row, n in enumerate(LENGTHS):
        hidden_diff = max(hidden_diff, (ours.hidden[row, :n] - ref_out[row, :n]).abs().max().item())
    print(f"torch parity ({'pre' if norm_first else 'post'}-norm, batch_first={batch_first}, "
          f"causal={causal}): attention {attn_diff:.2e}, output {hidden_diff:.2e}")
    assert attn_diff <= ATTN_TOL
    assert hidden_diff <= HIDDEN_TOL
    # Per head, not the head average: heads differ, and the average would not match them.
    first = ours.attentions["self"][0][0]  # (H, Q, K)
    assert (first - first.mean(0)).abs().max().item() > 0.05
    assert first.max().item() > 3 / max(LENGTHS)  # far from uniform


def test_layers_without_an_encoder_are_found_in_order():
    """Bare nn.TransformerEncoderLayers (no nn.TransformerEncoder) are walked in registration order."""
    torch.manual_seed(0)
    first = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True)
    second = nn.TransformerEncoderLayer(16, 2, 24, batch_first=True, norm_first=True)
    module = nn.ModuleDict({"a": first, "b": second}).eval()
    weights = torch_encoder.load_weights(module)
    assert [layer.norm_first for layer in weights.layers] == [False, True]
    assert weights.final_norm is None
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        ours = torch_encoder.forward(weights, {"inputs_embeds": x}).hidden
        expected = second(first(x))
    assert (ours - expected).abs().max().item() <= HIDDEN_TOL


def test_module_without_encoder_layers_is_refused():
    with pytest.raises(ValueError, match="no nn.TransformerEncoder"):
        torch_encoder.load_weights(nn.Sequential(nn.Linear(4, 4)))


def test_zero_rows_become_padding():
    from attnpipe.extract.embeddings import real_lengths

    array = np.ones((3, 5, 2), dtype=np.float32)
    array[1, 3:] = 0
    array[2, 1] = 0  # a zero row inside the sequence is real: only trailing rows are padding
    assert real_lengths(array, mask_zero_rows=False) == [5, 5, 5]
    assert real_lengths(array, mask_zero_rows=True) == [5, 3, 5]


def test_bias_free_layers_and_an_activation_module():
    """bias=False (no biases in projections or norms) and activation=nn.GELU() (a module, not a string)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 24, bias=False, batch_first=True, activation=nn.GELU())
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16, bias=False), enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    with torch.inference_mode():
        ours = torch_encoder.forward(torch_encoder.load_weights(encoder), {"inputs_embeds": x})
        _, ref = encoder.layers[0].self_attn(x, x, x, need_weights=True, average_attn_weights=False)
        expected = encoder(x)
    assert (ours.attentions["self"][0] - ref).abs().max().item() <= ATTN_TOL
    assert (ours.hidden - expected).abs().max().item() <= HIDDEN_TOL


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_attention_only_passes_are_the_full_passes_to_the_bit(tiny_vit_dir, tmp_path, norm_first):
    """forward(hidden=False) (a plain extraction) stops after the last kept layer: the same bits."""
    from PIL import Image

    model = load_model(tiny_vit_dir, torch.device("cpu"), input_kind="image")
    images = [Image.open(p).convert("RGB") for p in write_test_images(tmp_path)]
    vit_batch = {"pixel_values": model.processor(images=images, return_tensors="pt")["pixel_values"]}
    weights = torch_encoder.load_weights(make_encoder(norm_first, True, "gelu", final_norm=norm_first))
    torch.manual_seed(1)
    torch_batch = {"inputs_embeds": torch.randn(len(LENGTHS), max(LENGTHS), 32),
                   "attention_mask": torch.tensor([[1] * n + [0] * (max(LENGTHS) - n) for n in LENGTHS])}
    for family, family_weights, batch in ((vit, model.weights, vit_batch), (torch_encoder, weights, torch_batch)):
        with torch.inference_mode():
            full = family.forward(family_weights, batch).attentions["self"]
            for keep in ({0}, set(full)):
                short = family.forward(family_weights, batch, keep_layers={"self": frozenset(keep)}, hidden=False)
                assert short.hidden is None and sorted(short.attentions["self"]) == sorted(keep)
                assert all(torch.equal(short.attentions["self"][i], full[i]) for i in keep)
