"""Input adapter for encoder-decoder models (T5, BART, Marian): source/target pairs.

Each pair is run with teacher forcing. The source is tokenized as the model's input; the target
is tokenized as its labels (`text_target`, so a Marian model uses its target vocabulary), and the
decoder's input is the model's decoder start token followed by the labels shifted right by one,
exactly as transformers builds `decoder_input_ids` from `labels`. Row i of the decoder and
cross-attention is therefore decoder input token i, the position that predicts label i.

Stored per pair (attnpipe.store, schema version 2): the encoder self-attention as `attention`
(source x source), and in `target` the decoder's causal self-attention (target x target), the
decoder -> encoder cross-attention (target x source) and both token lists. The runner
(attnpipe.extract.runner) batches, guards, verifies and writes pairs like any other input.
"""

from __future__ import annotations

import numpy as np
import torch

from attnpipe import store
from attnpipe.extract.corpus import Pair
from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import mask, pad
from attnpipe.extract.inputs import Batch, encode, max_length

# T5 has relative positions and so no position table to bound the length: its pre-training length.
T5_DEFAULT_MAX_LENGTH = 512


class _TargetSide:
    """The tokenizer, called on targets the way transformers tokenizes labels (`text_target`)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.is_fast = getattr(tokenizer, "is_fast", False)

    def __call__(self, texts, **kwargs):
        return self._tokenizer(text_target=texts, **kwargs)


def decoder_start_token_id(model) -> int:
    """The model's decoder start token (T5, Marian: pad; BART: </s>), from its config."""
    config = model.hf_model.config
    start = getattr(config, "decoder_start_token_id", None)
    if start is None:  # some checkpoints keep it only in generation_config.json
        start = getattr(getattr(model.hf_model, "generation_config", None), "decoder_start_token_id", None)
    if start is None:
        raise AttnpipeError(
            f"{model.model_dir}/config.json has no decoder_start_token_id: the decoder input cannot be "
            "built from the target (set it in config.json; T5 and Marian use the pad token id)"
        )
    return int(start)


def seq2seq_max_length(model, requested: int | None) -> int:
    if hasattr(model.hf_model.config, "max_position_embeddings"):  # BART, Marian: the position table
        return max_length(model, requested)
    # T5: relative positions, no table; the tokenizer's limit, else T5's pre-training length.
    limit = getattr(model.tokenizer, "model_max_length", None)
    limit = T5_DEFAULT_MAX_LENGTH if not limit or limit > 10**6 else int(limit)
    if requested is None:
        return limit
    if requested < 2:
        raise AttnpipeError(f"--max-length {requested} is too small: it must leave room for special tokens")
    return requested


class PairInputs:
    """Source/target pairs for an encoder-decoder model: kinds self (encoder), decoder and cross."""

    label = "pair"
    input_kind = "text"

    def __init__(self, pairs: list[Pair], model, requested_max_length: int | None):
        self.pairs = pairs
        self.ids = [p.id for p in pairs]
        self.tokenizer = model.tokenizer
        self.max_length = seq2seq_max_length(model, requested_max_length)
        start = decoder_start_token_id(model)
        special_ids = set(self.tokenizer.all_special_ids)
        # Pairs are tokenized at once: the decoder input is built from every label list.
        self.src = encode(self.tokenizer, [p.source for p in pairs], self.max_length)
        self.tgt = encode(_TargetSide(self.tokenizer), [p.target for p in pairs], self.max_length)
        labels = self.tgt.input_ids
        # Teacher forcing: decoder input = start token + labels shifted right (transformers' shift_tokens_right).
        self.dec_ids = [[start] + row[:-1] for row in labels]
        self.dec_special = [[start in special_ids] + [bool(x) for x in row[:-1]]
                            for row in self.tgt.special_tokens_mask]
        self.src_lengths = [len(ids) for ids in self.src.input_ids]
        self.tgt_lengths = [len(ids) for ids in self.dec_ids]
        self.widths = [s + t for s, t in zip(self.src_lengths, self.tgt_lengths, strict=True)]
        pad_id = model.hf_model.config.pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        src = [self.src_lengths[i] for i in indices]
        tgt = [self.tgt_lengths[i] for i in indices]
        tensors = {
            "input_ids": pad([self.src.input_ids[i] for i in indices], self.pad_id, device),
            "attention_mask": mask(src, device),
            "decoder_input_ids": pad([self.dec_ids[i] for i in indices], self.pad_id, device),
            "decoder_attention_mask": mask(tgt, device),
        }
        tok = self.tokenizer
        items = []
        for i in indices:
            s, t = self.src_lengths[i], self.tgt_lengths[i]
            target = store.TargetAttention(
                text=self.pairs[i].target,
                tokens=tuple(tok.convert_ids_to_tokens(self.dec_ids[i])),
                token_ids=np.asarray(self.dec_ids[i], dtype=np.int64),
                special_tokens_mask=np.asarray(self.dec_special[i], dtype=bool),
                labels=tuple(tok.convert_ids_to_tokens(self.tgt.input_ids[i])),
                label_ids=np.asarray(self.tgt.input_ids[i], dtype=np.int64),
                truncated=self.tgt.untruncated_lengths[i] > t,
                num_tokens_untruncated=self.tgt.untruncated_lengths[i],
                decoder_attention=None,  # filled by the runner's sink
                cross_attention=None,
            )
            items.append(store.TextAttention(
                id=self.ids[i],
                text=self.pairs[i].source,
                tokens=tuple(tok.convert_ids_to_tokens(self.src.input_ids[i])),
                token_ids=np.asarray(self.src.input_ids[i], dtype=np.int64),
                special_tokens_mask=np.asarray(self.src.special_tokens_mask[i], dtype=bool),
                offsets=self.src.offsets[i],
                word_ids=self.src.word_ids[i],
                # a pair is truncated when either side was cut (reported once, by its id)
                truncated=self.src.untruncated_lengths[i] > s,
                num_tokens_untruncated=self.src.untruncated_lengths[i],
                attention=None,
                target=target,
            ))
        return Batch(indices, tensors, items, {"self": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)})
