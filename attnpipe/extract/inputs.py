"""Input adapters: each turns one kind of input into what the runner's one loop needs.

An adapter knows its items' ids and padded widths (for the batching) and `prepare`s a batch:
the tensors the family forward takes (named as transformers names them, so the same dict runs
the transformers model for --verify), the per-item metadata to store (a store.TextAttention
without its attention), and per attention kind the real query and key lengths of each row.
Texts live here; pairs (pairs.py), images (images.py) and embeddings (embeddings.py) beside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import chain

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
    # Every text's spans and words as one array each, then cut per text (views): converting a
    # text's list of pairs with np.asarray cost more than tokenizing it.
    lengths = [len(ids) for ids in enc["input_ids"]]
    total = sum(lengths)
    if fast:
        spans = np.fromiter(chain.from_iterable(chain.from_iterable(enc["offset_mapping"])), np.int64, 2 * total)
        words = np.fromiter((-1 if w is None else w for i in range(len(texts)) for w in enc.word_ids(i)),
                            np.int64, total)
    else:  # slow tokenizers know no character spans: documented as -1
        spans, words = np.full(2 * total, -1, dtype=np.int64), np.full(total, -1, dtype=np.int64)
    cuts = np.cumsum(lengths)[:-1]
    offsets = np.split(spans.reshape(total, 2), cuts) if lengths else []  # (n, 2) each
    word_ids = np.split(words, cuts) if lengths else []
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


# Texts tokenized together, then batched by length among themselves (TextInputs.batch_order): each
# text is tokenized once, and a window's encodings are all a run holds, whatever the corpus size.
WINDOW_TEXTS = 4096
WINDOW_CHARS = 1 << 20  # or fewer texts, when they are long (an encoding costs ~100 B a token)


def text_windows(texts: list[Text]) -> Iterator[range]:
    """Consecutive ranges of at most WINDOW_TEXTS texts and (one long text aside) WINDOW_CHARS characters."""
    start = chars = 0
    for i, t in enumerate(texts):
        if i > start and (i - start >= WINDOW_TEXTS or chars + len(t.text) > WINDOW_CHARS):
            yield range(start, i)
            start, chars = i, 0
        chars += len(t.text)
    if start < len(texts):
        yield range(start, len(texts))


def one_ahead(make: Callable[[int], Encoded], count: int) -> Iterator[Encoded]:
    """make(0) .. make(count - 1) in order, each made in a worker thread while the caller works on
    the one before. Only that thread calls `make` (so only it encodes: the caller's thread reads
    the tokenizer's vocabulary meanwhile, no setting); a caller that stops early waits at most
    for the one being made."""
    with ThreadPoolExecutor(1, thread_name_prefix="attnpipe-tokenize") as pool:
        upcoming = pool.submit(make, 0)
        try:
            for k in range(1, count + 1):
                current = upcoming.result()
                if k < count:
                    upcoming = pool.submit(make, k)
                yield current
        finally:
            upcoming.cancel()


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
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.token_types = getattr(model.weights, "token_type", None) is not None
        self.lengths = np.zeros(len(texts), np.int64)  # each text's tokens, known once its window is encoded
        self._widths: list[int] | None = None
        self._window: tuple[int, Encoded] | None = None  # (first text, the window's encodings)

    @property
    def widths(self) -> list[int]:
        """Every text's token count at once (--estimate); a run gets them window by window."""
        if self._widths is None:
            self._widths = token_lengths(self.tokenizer, [t.text for t in self.texts], self.max_length)
        return self._widths

    def batch_order(self, plan: Callable[[list[int]], Iterator[list[int]]]) -> Iterator[list[int]]:
        """The run's batches: each window of texts tokenized once, then `plan`ned by length.

        A fast tokenizer encodes the next window in a thread while this one's batches run
        (one_ahead): its Rust side works without the GIL, on a core the forward pass of a small
        model leaves idle. A window's encoding is the same whichever thread makes it, and an
        error in it is raised when the run reaches that window, as before."""
        windows = list(text_windows(self.texts))

        def encoded(k: int) -> Encoded:
            return encode(self.tokenizer, [self.texts[i].text for i in windows[k]], self.max_length)

        ahead = getattr(self.tokenizer, "is_fast", False) and len(windows) > 1
        encodings = one_ahead(encoded, len(windows)) if ahead else map(encoded, range(len(windows)))
        for window, enc in zip(windows, encodings):
            widths = [len(ids) for ids in enc.input_ids]
            self.lengths[window.start:window.stop] = widths
            self._window = (window.start, enc)
            for batch in plan(widths):
                yield [window.start + i for i in batch]
        self._window = None

    def prepare(self, indices: list[int], device: torch.device) -> Batch:
        if self._window is None:  # a batch outside batch_order: tokenized on its own
            encoded, rows = encode(self.tokenizer, [self.texts[i].text for i in indices], self.max_length), None
            self.lengths[indices] = [len(ids) for ids in encoded.input_ids]
        else:
            first, encoded = self._window
            rows = [i - first for i in indices]
            if rows[0] < 0 or max(rows) >= len(encoded.input_ids):
                raise ValueError(f"texts {indices[:5]} are not in the window being run")
        row_of = range(len(indices)) if rows is None else rows
        input_ids = [encoded.input_ids[r] for r in row_of]
        lengths = [len(ids) for ids in input_ids]
        tensors = {"input_ids": pad(input_ids, self.pad_id, device), "attention_mask": mask(lengths, device)}
        if encoded.token_type_ids is not None and self.token_types:
            tensors["token_type_ids"] = pad([encoded.token_type_ids[r] for r in row_of], 0, device)
        items = [text_item(self.ids[i], self.texts[i].text, encoded, r, self.tokenizer, attention=None)
                 for r, i in zip(row_of, indices, strict=True)]
        return Batch(indices, tensors, items, {"self": (lengths, lengths)})
