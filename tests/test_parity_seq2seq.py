"""The specification for encoder-decoders: our forward pass against transformers' eager attention.

Tiny random T5 (plain and gated), mT5, BART and Marian models saved to a temp folder and loaded like a
user's checkpoint; one batch with padding on both the source and the target side. On real
positions: encoder, decoder and cross-attention per head within 1e-5, encoder and decoder
hidden states within 1e-4, rows summing to 1, the decoder's future keys and every padded key
exactly 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnpipe.extract.loading import load_model
from attnpipe.models import bart, is_seq2seq, t5
from seq2seq_tiny import save_tiny_seq2seq

ATTN_TOL = 1e-5
HIDDEN_TOL = 1e-4
VARIANTS = ("t5", "t5-gated", "mt5", "bart", "marian")
SRC_LENGTHS = [7, 12, 3, 10]  # padded to 12: T5's log-spaced buckets are reached (encoder: distance >= 2)
TGT_LENGTHS = [5, 2, 9, 9]  # padded to 9, not in the sources' order (decoder log buckets: distance >= 4)


@pytest.fixture(scope="module")
def tiny_seq2seq(tmp_path_factory):
    cache = {}

    def make(variant: str):
        if variant not in cache:
            cache[variant] = save_tiny_seq2seq(variant, tmp_path_factory.mktemp(variant))
        return cache[variant]

    return make


def padded_batch(lengths, pad_id, seed):
    """Random real ids (clear of the special ids 0-4 and the pad id), right-padded."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 110, (len(lengths), max(lengths)), generator=generator)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, pad_id), mask


def run_both(model_dir):
    model = load_model(model_dir, torch.device("cpu"))
    pad = model.hf_model.config.pad_token_id
    src, src_mask = padded_batch(SRC_LENGTHS, pad, seed=1)
    tgt, tgt_mask = padded_batch(TGT_LENGTHS, pad, seed=2)
    with torch.inference_mode():
        ours = model.family.forward(model.weights, dict(input_ids=src, attention_mask=src_mask,
                                                       decoder_input_ids=tgt, decoder_attention_mask=tgt_mask))
        # use_cache=False: with a cache, transformers' decoder keys come out of torch.cat as a
        # contiguous copy and the matmul rounds differently (up to 5e-5 with these saturated
        # tiny models); the math is the same and extraction never uses a cache.
        ref = model.hf_model(input_ids=src, attention_mask=src_mask, decoder_input_ids=tgt,
                             decoder_attention_mask=tgt_mask, output_attentions=True, use_cache=False)
    assert len(ref.encoder_attentions) == model.num_layers > 0, "reference gave no encoder attentions"
    assert len(ref.decoder_attentions) == len(ref.cross_attentions) == model.weights.decoder_num_layers > 0
    return model, ours, ref


def max_diffs(ours, ref):
    """Largest |ours - eager| of each kind over real (query, key) positions, per head."""
    diffs = dict(encoder=0.0, decoder=0.0, cross=0.0, encoder_hidden=0.0, decoder_hidden=0.0)
    for row, (s, t) in enumerate(zip(SRC_LENGTHS, TGT_LENGTHS)):
        pairs = (
            ("encoder", ours.attentions["self"], ref.encoder_attentions, s, s),
            ("decoder", ours.attentions["decoder"], ref.decoder_attentions, t, t),
            ("cross", ours.attentions["cross"], ref.cross_attentions, t, s),
        )
        for kind, mine, theirs, q, k in pairs:
            for layer in mine:
                diff = (mine[layer][row, :, :q, :k] - theirs[layer][row, :, :q, :k]).abs().max().item()
                diffs[kind] = max(diffs[kind], diff)
        diffs["encoder_hidden"] = max(diffs["encoder_hidden"], (
            ours.encoder_hidden[row, :s] - ref.encoder_last_hidden_state[row, :s]).abs().max().item())
        diffs["decoder_hidden"] = max(diffs["decoder_hidden"], (
            ours.hidden[row, :t] - ref.last_hidden_state[row, :t]).abs().max().item())
    return diffs


@pytest.mark.parametrize("variant", VARIANTS)
def test_tiny_seq2seq_matches_transformers_eager(tiny_seq2seq, variant):
    model, ours, ref = run_both(tiny_seq2seq(variant))
    assert is_seq2seq(model.model_type)
    diffs = max_diffs(ours, ref)
    print(variant, {k: f"{v:.1e}" for k, v in diffs.items()})  # the README's parity figures (-s)
    for kind in ("encoder", "decoder", "cross"):
        assert diffs[kind] <= ATTN_TOL, (kind, diffs)
    assert diffs["encoder_hidden"] <= HIDDEN_TOL and diffs["decoder_hidden"] <= HIDDEN_TOL, diffs

    for row, (s, t) in enumerate(zip(SRC_LENGTHS, TGT_LENGTHS)):
        future = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
        for layer in range(model.weights.decoder_num_layers):
            dec = ours.attentions["decoder"][layer][row]  # (H, T, T)
            cross = ours.attentions["cross"][layer][row]  # (H, T, S)
            assert cross.shape[-1] == max(SRC_LENGTHS) and dec.shape[-1] == max(TGT_LENGTHS)
            assert torch.all(dec[:, :t, :t][:, future] == 0), "future target keys must get exactly 0"
            assert torch.all(dec[:, :t, t:] == 0) and torch.all(cross[:, :t, s:] == 0), "padded keys: 0"
            for probs in (dec[:, :t, :t], cross[:, :t, :s]):
                torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]), rtol=0, atol=1e-5)
        for layer in range(model.num_layers):
            enc = ours.attentions["self"][layer][row, :, :s, :]
            assert torch.all(enc[:, :, s:] == 0)
            torch.testing.assert_close(enc.sum(-1), torch.ones_like(enc[..., 0]), rtol=0, atol=1e-5)
    # Non-uniform attention, so the comparison above could catch a wrong scale, bias or mask.
    longest = SRC_LENGTHS.index(max(SRC_LENGTHS))
    for attentions in (ours.attentions["self"], ours.attentions["cross"]):
        assert attentions[0][longest].max().item() > 3 / max(SRC_LENGTHS)


@pytest.mark.parametrize("variant, family, wrong", [
    ("t5", t5, lambda q: 1.0 / math.sqrt(q.shape[-1])),  # the usual 1/√d, which T5 does not use
    ("bart", bart, None),  # 1/√d off by 5 %
])
def test_a_wrong_scale_fails_parity(tiny_seq2seq, monkeypatch, variant, family, wrong):
    """The parity figures above are not vacuous: a wrong logit scale breaks them by far."""
    real = family.attention_probs

    def scaled(q, k, scale, mask=None):
        return real(q, k, wrong(q) if wrong else scale * 1.05, mask)

    monkeypatch.setattr(family, "attention_probs", scaled)
    _, ours, ref = run_both(tiny_seq2seq(variant))
    diffs = max_diffs(ours, ref)
    print(variant, "wrong scale:", {k: f"{v:.1e}" for k, v in diffs.items()})
    assert min(diffs["encoder"], diffs["decoder"], diffs["cross"]) > 100 * ATTN_TOL, diffs


def test_t5_position_bias_is_shared_from_the_first_layer(tiny_seq2seq):
    """Only block 0 of each stack owns a bias table; our pass uses it in every layer."""
    model = load_model(tiny_seq2seq("t5"), torch.device("cpu"))
    for stack in (model.hf_model.encoder, model.hf_model.decoder):
        owners = [b.layer[0].SelfAttention.has_relative_attention_bias for b in stack.block]
        assert owners == [True] + [False] * (len(owners) - 1)
    assert model.weights.encoder.bias.shape == (8, 4) and model.weights.encoder.bidirectional
    assert not model.weights.decoder.bidirectional
