"""Input adapters: each turns one kind of input into what the runner's one loop needs.

An adapter knows its items' ids and padded widths (for the batching) and `prepare`s a batch:
the tensors the family forward takes (named as transformers names them, so the same dict runs
the transformers model for --verify), the per-item metadata to store (a store.TextAttention
without its attention), and per attention kind the real query and key lengths of each row.
Texts live here; pairs (pairs.py), images (images.py) and embeddings (embeddings.py) beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from attnpipe import store
from attnpipe.errors import AttnpipeError
from attnpipe.extract.batching import mask, pad
from attnpipe.extract.corpus import Text


@dataclass
class Batch:
    indices: list[int]  # positions of the batch's items in the user's order
    tensors: dict[str, torch.Tensor]  # the forward's (and transformers') keyword arguments
    items: list[store.TextAttention]  # per item, everything but the attention (attention=None)
    lengths: dict[str, tuple[list[int], list[int]]]  # kind -> (real query lengths, real key lengths)


def max_length(model, requested: int | None) -> int:
    """The token limit of a run: --max-length, checked against the model's positions, or that limit."""
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or 1 << 30  # --method hf: e.g. ALiBi models have none
    position_pad_id = getattr(model.weights, "position_pad_id", None)
    if position_pad_id is not None:  # RoBERTa's positions start after pad_id
        limit -= position_pad_id + 1
    if requested is None:
        tokenizer_limit = getattr(model.tokenizer, "model_max_length", limit) or limit
        return int(min(limit, tokenizer_limit))
    if requested < 2:
        raise AttnpipeError(f"--max-length {requested} is too small: it must leave room for special tokens")
    if requested > limit:
        raise AttnpipeError(f"--max-length {requested} is more than the model's {limit} positions")
    return requested


@dataclass(frozen=True)
class Encoded:
    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    special_tokens_mask: list[list[int]]
    offsets: list[np.ndarray]
    word_ids: list[np.ndarray]
    untruncated_lengths: list[int]


SPLIT_SPECIAL_TOKENS = True  # special-token strings inside a text are tokenized as the text they are


def encode(tokenizer, texts: list[str], max_length: int) -> Encoded:
    """Tokenize once (truncated); only texts that reach max_length are counted again untruncated."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(
        texts,
        truncation=True,
        max_length=max_length,
        return_special_tokens_mask=True,
        return_offsets_mapping=fast,
        # "[CLS]" typed in a text is text: without this it became the special token's id while
        # special_tokens_mask said False (only the tokenizer's own [CLS]/[SEP] are special).
        split_special_tokens=SPLIT_SPECIAL_TOKENS,
    )
    untruncated = [len(ids) for ids in enc["input_ids"]]
    # A text shorter than the limit was not cut; only those at the limit may have been.
    at_limit = [i for i, n in enumerate(untruncated) if n >= max_length]
    if at_limit:
        full = tokenizer([texts[i] for i in at_limit], truncation=False,
                         split_special_tokens=SPLIT_SPECIAL_TOKENS)["input_ids"]
        for i, ids in zip(at_limit, full, strict=True):
            untruncated[i] = len(ids)
    offsets, word_ids = [], []
    for i in range(len(texts)):
        n = len(enc["input_ids"][i])
        if fast:
            offsets.append(np.asarray(enc["offset_mapping"][i], dtype=np.int64).reshape(n, 2))
            word_ids.append(np.array([-1 if w is None else w for w in enc.word_ids(i)], dtype=np.int64))
        else:  # slow tokenizers know no character spans: documented as -1
            offsets.append(np.full((n, 2), -1, dtype=np.int64))
            word_ids.append(np.full(n, -1, dtype=np.int64))
    return Encoded(
        input_ids=enc["input_ids"],
        token_type_ids=enc.get("token_type_ids"),
        special_tokens_mask=enc["special_tokens_mask"],
        offsets=offsets,
        word_ids=word_ids,
        untruncated_lengths=untruncated,
    )


# Texts tokenized at once when only their lengths are wanted (token_lengths): bounds the memory
# the tokenizer's encodings take, whatever the corpus size.
LENGTH_WINDOW = 1024


def token_lengths(tokenizer, texts: list[str], max_length: int) -> list[int]:
    """Each text's token count after truncation to max_length, LENGTH_WINDOW texts at a time."""
    lengths: list[int] = []
    for start in range(0, len(texts), LENGTH_WINDOW):
        window = tokenizer(texts[start:start + LENGTH_WINDOW], truncation=True, max_length=max_length,
                           split_special_tokens=SPLIT_SPECIAL_TOKENS)
        lengths.extend(len(ids) for ids in window["input_ids"])
    return lengths


def text_item(item_id: str, text: str, encoded: Encoded, i: int, tokenizer, **fields) -> store.TextAttention:
    """Text `i` of an encoded batch as a TextAttention; `fields` gives its attention (and extras)."""
    n = len(encoded.input_ids[i])
    return store.TextAttention(
        id=item_id,
        text=text,
        tokens=tuple(tokenizer.convert_ids_to_tokens(encoded.input_ids[i])),
        token_ids=np.asarray(encoded.input_ids[i], dtype=np.int64),
        special_tokens_mask=np.asarray(encoded.special_tokens_mask[i], dtype=bool),
        offsets=encoded.offsets[i],
        word_ids=encoded.word_ids[i],
        truncated=encoded.untruncated_lengths[i] > n,
        num_tokens_untruncated=encoded.untruncated_lengths[i],
        **fields,
    )


class TextInputs:
    """Texts for a text model (encoders, causal LMs, --method hf)."""

    label = "text"
    input_kind = "text"
    generation = None  # the settings when the model generated the text (PairInputs, ContinuationInputs)
    generated_tokens = 0

    def __init__(self, texts: list[Text], model, requested_max_length: int | None):
        self.texts = texts
        self.ids = [t.id for t in texts]
        self.tokenizer = model.tokenizer
        self.max_length = max_length(model, requested_max_length)
        self.widths = token_lengths(self.tokenizer, [t.text for t in texts], self.max_length)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.token_types = getattr(model.weights, "token_type", None) is not None

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        lengths = [self.widths[i] for i in indices]
        # Each batch is tokenized in full on its own: a corpus's encodings are never all held at once.
        encoded = encode(self.tokenizer, [self.texts[i].text for i in indices], self.max_length)
        if [len(ids) for ids in encoded.input_ids] != lengths:
            raise AttnpipeError(f"the tokenizer gave texts {[self.ids[i] for i in indices][:5]} "
                                "different lengths on a second call; it must be deterministic")
        tensors = {"input_ids": pad(encoded.input_ids, self.pad_id, device), "attention_mask": mask(lengths, device)}
        if encoded.token_type_ids is not None and self.token_types:
            tensors["token_type_ids"] = pad(encoded.token_type_ids, 0, device)
        items = [text_item(self.ids[i], self.texts[i].text, encoded, row, self.tokenizer, attention=None)
                 for row, i in enumerate(indices)]
        return Batch(indices, tensors, items, {"self": (lengths, lengths)})
