"""Input adapter for encoder-decoder models (T5, BART, Marian): source/target pairs.

Each pair is run with teacher forcing. The source is tokenized as the model's input; the target
is tokenized as its labels (`text_target`, so a Marian model uses its target vocabulary), and the
decoder's input is the model's decoder start token followed by the labels shifted right by one,
exactly as transformers builds `decoder_input_ids` from `labels`. Row i of the decoder and
cross-attention is therefore decoder input token i, the position that predicts label i.

Stored per pair (attnpipe.store, schema versions 3 and 2 alike): the encoder self-attention as `attention`
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
from attnpipe.extract.inputs import Batch, Encoded, encode, max_length, token_lengths

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

    def __init__(self, pairs: list[Pair], model, requested_max_length: int | None,
                 generated_labels: list[list[int]] | None = None, generation: dict | None = None):
        """`generated_labels`: per pair, the label ids of a target the model generated
        (attnpipe/extract/generate.py), used instead of tokenizing `pair.target`; `generation`:
        how (the file's generation provenance)."""
        self.pairs = pairs
        self.generation = generation
        self.ids = [p.id for p in pairs]
        self.tokenizer = model.tokenizer
        self.target_side = _TargetSide(self.tokenizer)
        self.max_length = seq2seq_max_length(model, requested_max_length)
        self.start = decoder_start_token_id(model)
        self.special_ids = set(self.tokenizer.all_special_ids)
        # Only the lengths now (for the batching); each batch is tokenized in full on its own, so a
        # corpus's encodings are never all held at once. The decoder input (start token + labels
        # shifted right) has as many tokens as the labels.
        self.src_lengths = token_lengths(self.tokenizer, [p.source for p in pairs], self.max_length)
        self.generated_labels = generated_labels
        if generated_labels is None:
            self.tgt_lengths = token_lengths(self.target_side, [p.target for p in pairs], self.max_length)
        else:
            self.tgt_lengths = [len(labels) for labels in generated_labels]
        self.generated_tokens = sum(self.tgt_lengths) if generated_labels is not None else 0
        self.widths = [s + t for s, t in zip(self.src_lengths, self.tgt_lengths, strict=True)]
        pad_id = model.hf_model.config.pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        src_enc = encode(self.tokenizer, [self.pairs[i].source for i in indices], self.max_length)
        tgt_enc = self._targets(indices)
        src = [self.src_lengths[i] for i in indices]
        tgt = [self.tgt_lengths[i] for i in indices]
        if [len(ids) for ids in src_enc.input_ids] != src or [len(ids) for ids in tgt_enc.input_ids] != tgt:
            raise AttnpipeError(f"the tokenizer gave pairs {[self.ids[i] for i in indices][:5]} "
                                "different lengths on a second call; it must be deterministic")
        # Teacher forcing: decoder input = start token + labels shifted right (transformers' shift_tokens_right).
        dec_ids = [[self.start] + row[:-1] for row in tgt_enc.input_ids]
        dec_special = [[self.start in self.special_ids] + [bool(x) for x in row[:-1]]
                       for row in tgt_enc.special_tokens_mask]
        tensors = {
            "input_ids": pad(src_enc.input_ids, self.pad_id, device),
            "attention_mask": mask(src, device),
            "decoder_input_ids": pad(dec_ids, self.pad_id, device),
            "decoder_attention_mask": mask(tgt, device),
        }
        tok = self.tokenizer
        items = []
        for row, i in enumerate(indices):
            s, t = src[row], tgt[row]
            generated = self.generated_labels is not None
            target = store.TargetAttention(
                # a generated target's text is its labels decoded (special tokens skipped)
                text=self.tokenizer.decode(tgt_enc.input_ids[row], skip_special_tokens=True) if generated
                else self.pairs[i].target,
                tokens=tuple(tok.convert_ids_to_tokens(dec_ids[row])),
                token_ids=np.asarray(dec_ids[row], dtype=np.int64),
                special_tokens_mask=np.asarray(dec_special[row], dtype=bool),
                labels=tuple(tok.convert_ids_to_tokens(tgt_enc.input_ids[row])),
                label_ids=np.asarray(tgt_enc.input_ids[row], dtype=np.int64),
                truncated=tgt_enc.untruncated_lengths[row] > t,
                num_tokens_untruncated=tgt_enc.untruncated_lengths[row],
                decoder_attention=None,  # filled by the runner's sink
                cross_attention=None,
                # every decoder input token but the start token was written by generate
                generated=np.asarray([False] + [True] * (t - 1), dtype=bool) if generated else None,
            )
            items.append(store.TextAttention(
                id=self.ids[i],
                text=self.pairs[i].source,
                tokens=tuple(tok.convert_ids_to_tokens(src_enc.input_ids[row])),
                token_ids=np.asarray(src_enc.input_ids[row], dtype=np.int64),
                special_tokens_mask=np.asarray(src_enc.special_tokens_mask[row], dtype=bool),
                offsets=src_enc.offsets[row],
                word_ids=src_enc.word_ids[row],
                # a pair is truncated when either side was cut (reported once, by its id)
                truncated=src_enc.untruncated_lengths[row] > s,
                num_tokens_untruncated=src_enc.untruncated_lengths[row],
                attention=None,
                target=target,
            ))
        return Batch(indices, tensors, items, {"self": (src, src), "decoder": (tgt, tgt), "cross": (tgt, src)})

    def _targets(self, indices: list[int]) -> Encoded:
        """The batch's labels: the targets tokenized as labels, or the generated label ids."""
        if self.generated_labels is None:
            return encode(self.target_side, [self.pairs[i].target for i in indices], self.max_length)
        rows = [self.generated_labels[i] for i in indices]
        return Encoded(input_ids=rows, token_type_ids=None,
                       special_tokens_mask=[[int(x in self.special_ids) for x in row] for row in rows],
                       offsets=[], word_ids=[], untruncated_lengths=[len(row) for row in rows])
