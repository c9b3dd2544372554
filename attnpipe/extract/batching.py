"""Grouping items into forward passes: length-sorted, under a token and an attention budget.

Every input kind is batched the same way: by each item's padded width (tokens; for a
source/target pair the source plus the target), longest first, so little padding is computed.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

# Padded tokens (texts x longest length) per forward pass. bench/bench_extract.py measured
# batches of 2k-8k tokens equally fast on MiniLM on 2 CPU cores; 4096 keeps a batch's
# attention for one layer of a 12-head model at <= 4096 x 12 x T x 4 bytes.
DEFAULT_MAX_TOKENS_PER_BATCH = 4096
# Texts per forward pass at most (--batch-size): the token budget above is what binds for texts of
# under 32 tokens. With a cap of 32, short texts ran in batches of ~1,000 tokens, and a small model
# then paid torch's per-operation cost once per 32 texts. Whole processes, one after the other: the
# bench's small BERT on 20k texts of ~30 tokens took 8.7 s at 32 against 6.9 s at 128, MiniLM on
# 512 demo texts 7.7-7.9 s against 7.4 s. HF eager gets faster with bigger batches too:
# bench_extract.py --startup also runs it at this size.
DEFAULT_BATCH_SIZE = 128
# One layer's float32 attention for a batch (texts x heads x T x T x 4 bytes) stays under this many
# MiB; a text over it goes alone (and is streamed layer by layer). Attention grows with the square
# of the length: under the token budget alone, one layer of a 12-head batch is 4096 x 12 x T x 4
# bytes (25 MB at T=128, 100 MB at T=512), and a run's peak memory then depended on how many full
# batches of its longest texts the corpus had. 16 MiB is 21 MiniLM texts of 128 tokens; bench:
# no slower than the token budget alone on the demo corpus.
DEFAULT_BATCH_ATTENTION_MB = 16.0


def length_sorted_batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Indices grouped into batches of similar length (longest first), to compute little padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def token_budget_batches(lengths: list[int], max_tokens: int, max_texts: int,
                         max_cells: int | None = None) -> Iterator[list[int]]:
    """Indices in batches of similar length (longest first) whose padded size, texts x longest
    length, stays within `max_tokens`, and whose attention cells per head, texts x longest
    length squared, within `max_cells` (a text over either goes alone); at most `max_texts` texts each."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batch: list[int] = []
    for i in order:
        width = max(lengths[batch[0]] if batch else lengths[i], 1)  # the first is the longest
        texts = len(batch) + 1
        if batch and (texts * width > max_tokens or len(batch) >= max_texts
                      or (max_cells is not None and texts * width * width > max_cells)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def batches(lengths: list[int], config, num_heads: int) -> Iterator[list[int]]:
    """The run's batches: `token_budget_batches` under the config's token, text and attention budgets
    (`config`: an ExtractConfig)."""
    max_cells = int(config.batch_attention_mb * 2**20 / (4 * max(num_heads, 1)))
    return token_budget_batches(lengths, config.max_tokens_per_batch, config.batch_size, max_cells)


def pad(rows: list[list[int]], value: int, device: torch.device) -> torch.Tensor:
    """Right-pad lists of ids to one (B, T) int64 tensor."""
    width = max(len(row) for row in rows)
    out = np.full((len(rows), width), value, dtype=np.int64)
    for i, row in enumerate(rows):  # numpy copies each list at C speed (torch.tensor of nested lists did not)
        out[i, :len(row)] = row
    return torch.from_numpy(out).to(device)


def mask(lengths: list[int], device: torch.device) -> torch.Tensor:
    """(B, T) int64 attention mask: 1 on each row's first `lengths[b]` positions."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]
    return torch.from_numpy(real.astype(np.int64)).to(device)
