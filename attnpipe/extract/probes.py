"""Probe corpora of repeated random token sequences, for the circuit detectors (docs/METRICS.md).

A probe text is `prefix + A + A`: a random prefix of `prefix` tokens, then a random sequence A of
`length` tokens, then A again, drawn from the tokens of a model's own tokenizer, seeded. On the
second A an induction head attends to the token after the previous occurrence of the current one
and the model can predict each token from context (the in-context loss of Olsson et al. 2022).

Every text is written as ordinary corpus JSONL ({"id", "text", ...}), so the CLI and the workflow
read it like any corpus; the text is the tokenizer's own decoding of the ids and is kept only if
encoding it gives back exactly those ids (so the stored `token_ids` are the drawn ones).

    from attnpipe.extract.probes import ProbeSpec, probe_records
    records = probe_records(tokenizer, ProbeSpec(num_texts=32, seed=0))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from attnpipe.errors import AttnpipeError

# Draws of one sequence before giving up on a tokenizer whose decoded texts do not re-encode.
MAX_ATTEMPTS = 100
BOS = "<|endoftext|>"  # the word-level tokenizer's one special token (GPT-2's spelling)


@dataclass(frozen=True)
class ProbeSpec:
    """How probe sequences are drawn: A has min_length..max_length tokens, the prefix
    min_prefix..max_prefix (both ends included), tokens uniform over the usable vocabulary."""

    num_texts: int = 32
    seed: int = 0
    min_length: int = 10
    max_length: int = 40
    min_prefix: int = 0
    max_prefix: int = 10

    def check(self) -> None:
        if self.num_texts < 1:
            raise AttnpipeError(f"--num-texts must be at least 1, got {self.num_texts}")
        if not 1 <= self.min_length <= self.max_length:
            raise AttnpipeError(f"--length {self.min_length}-{self.max_length} is not a range of at "
                                "least 1 token (MIN-MAX, MIN <= MAX)")
        if not 0 <= self.min_prefix <= self.max_prefix:
            raise AttnpipeError(f"--prefix {self.min_prefix}-{self.max_prefix} is not a range of 0 or "
                                "more tokens (MIN-MAX, MIN <= MAX)")


def draw_sequence(rng: np.random.Generator, vocab: np.ndarray, spec: ProbeSpec) -> tuple[np.ndarray, int, int]:
    """(ids, prefix length, length of A) of one probe: prefix + A + A, ids drawn from `vocab`."""
    prefix = int(rng.integers(spec.min_prefix, spec.max_prefix + 1))
    length = int(rng.integers(spec.min_length, spec.max_length + 1))
    start = rng.choice(vocab, size=prefix)
    repeat = rng.choice(vocab, size=length)
    return np.concatenate([start, repeat, repeat]), prefix, length


def usable_vocab(tokenizer) -> np.ndarray:
    """Ids of the tokenizer's ordinary tokens: not special, and each decodes to a text that encodes
    back to itself alone (so sequences of them usually round-trip)."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for token_id in range(len(tokenizer)):
        if token_id in special:
            continue
        text = tokenizer.decode([token_id])
        if text.strip() and tokenizer(text, add_special_tokens=False)["input_ids"] == [token_id]:
            ids.append(token_id)
    if len(ids) < 2:
        raise AttnpipeError("the tokenizer has fewer than 2 ordinary tokens that encode back to themselves")
    return np.asarray(ids, dtype=np.int64)


def probe_records(tokenizer, spec: ProbeSpec) -> list[dict]:
    """The probe corpus: one record per text, {"id", "text", "prefix", "length"} (ids probe-000000...)."""
    spec.check()
    rng = np.random.default_rng(spec.seed)
    vocab = usable_vocab(tokenizer)
    records = []
    for index in range(spec.num_texts):
        for _ in range(MAX_ATTEMPTS):
            ids, prefix, length = draw_sequence(rng, vocab, spec)
            text = tokenizer.decode(ids.tolist())
            if tokenizer(text, add_special_tokens=False)["input_ids"] == ids.tolist():
                break
        else:
            raise AttnpipeError(f"could not draw probe text {index}: {MAX_ATTEMPTS} decoded sequences of "
                                "this tokenizer did not encode back to their ids (sub-word merges)")
        records.append({"id": f"probe-{index:06d}", "text": text, "prefix": prefix, "length": length})
    return records


def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of `vocab_size` ordinary tokens w0 .. w{N-1} plus BOS (id 0), which it
    puts first in every encoding: the tokenizer of the workflow's small induction models."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    if vocab_size < 2:
        raise AttnpipeError(f"--vocab-size must be at least 2, got {vocab_size}")
    vocab = {BOS: 0, **{f"w{i}": i + 1 for i in range(vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=BOS))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces (no ## tokens here)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS,
                                                unk_token=BOS, pad_token=BOS)
