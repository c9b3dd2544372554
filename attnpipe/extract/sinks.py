"""Where each checked layer goes: the matrices (all rows or a row subset) or per-head metrics.

The runner hands every kept layer of every kind to `Sink.layer(kind, layer, probs, check)`, with
`check` its guards (runner._guarded): nothing is stored before they pass. Three ways to store it:
- streaming (HDF5, one attention kind, no gradients): each text's layer is cropped to its real
  tokens on the torch side, converted to the storage dtype and queued for the writer thread (the
  text's tokens were `begin`-written first). The packed layout (version 3) takes a whole batch at
  once: one `begin_batch`, one `write_layer` per layer (the batch's texts one after the other,
  copied run by run of equal lengths: `stored_values`) and one `end_batch`; version 2 takes each
  text's layer split into its chunks;
- collecting (JSON, encoder-decoder pairs, --explain): a batch's cropped float32 layers are kept
  until the batch ends, then each item is written whole (`H5Writer.write` / one JSON document);
- metrics (--metrics-only): per-head metrics computed per layer in the writer thread.

Where the guards and the conversion run: in this (the main) thread, before the layer is queued;
but when the writer thread overlaps a forward pass on the CPU (a light model, or fewer torch
threads than cores: background.writer_plan), a batch layer's guards, conversion and write all
run there (`_check_and_write`), off the forward's critical path. A layer is handed over like
that only if twice its probabilities fit the writer's queue: a long text's layers stay here, so
its peak memory stays one layer of probabilities and not two.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from attnpipe import store
from attnpipe.extract.background import BackgroundWriter
from attnpipe.extract.inputs import Batch


@dataclasses.dataclass(frozen=True)
class Selection:
    """The stored layers and heads of one attention kind (model indices, sorted)."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    num_heads: int  # of the model (decoder heads for decoder / cross)

    @property
    def positions(self) -> dict[int, int]:
        return {layer: pos for pos, layer in enumerate(self.layers)}


def _check_and_write(check, probs: torch.Tensor, runs: list[tuple[int, int, int]], rows: str, dtype: str,
                     target, first: int, pos: int) -> None:
    """Guards, conversion and write of one batch layer (writer thread): a failed check raises
    here, is handed to the main thread by the writer, and nothing of the layer is stored."""
    with torch.inference_mode():
        check()
        values = stored_values(probs, runs, rows, dtype)
    target.write_layer(first, pos, values)


def _store_metrics(metrics, probs: torch.Tensor, values: np.ndarray, indices: list[int], pos: int) -> None:
    """One batch's layer of per-head metrics into values[texts, layer position] (writer thread)."""
    with torch.inference_mode():
        values[indices, pos] = metrics.layer(probs)  # (B, H', M)


def equal_runs(lengths: list[int]) -> list[tuple[int, int, int]]:
    """(first row, end row, length) of each run of consecutive rows of one length (a length-sorted
    batch has a few)."""
    runs, start = [], 0
    for row in range(1, len(lengths) + 1):
        if row == len(lengths) or lengths[row] != lengths[start]:
            runs.append((start, row, lengths[start]))
            start = row
    return runs


def stored_values(probs: torch.Tensor, runs: list[tuple[int, int, int]], rows: str, dtype: str) -> np.ndarray:
    """Every text's stored values of one (B, H, T, T) layer, text after text in C order (heads x
    stored query rows x real keys), in the storage dtype: one strided copy per run of equal lengths."""
    blocks = []
    for start, end, n in runs:
        first = n - 1 if rows == "last" else 0
        blocks.append(probs[start:end, :, first:n if rows == "all" else first + 1, :n])  # (g, H, r, n) view
    return to_storage_values(blocks, dtype)


def to_storage_values(blocks: list[torch.Tensor], dtype: str) -> np.ndarray:
    """Float tensors (views) back to back in C order as one flat array of the storage dtype,
    converted as they are copied (uint8: the float32 arithmetic of store.to_storage)."""
    out = torch.empty(sum(block.numel() for block in blocks), device=blocks[0].device,
                      dtype=torch.float32 if dtype == "uint8" else getattr(torch, dtype))
    at = 0
    for block in blocks:
        out[at:at + block.numel()].view(block.shape).copy_(block)
        at += block.numel()
    if dtype == "uint8":
        out = out.mul_(float(store.UINT8_SCALE)).round_().to(torch.uint8)
    return out.cpu().numpy()


class Sink:
    def __init__(self, storage: store.Storage, selections: dict[str, Selection], writer: BackgroundWriter | None,
                 *, stream: bool, metric_values: np.ndarray | None = None):
        self.storage = storage
        self.selections = selections
        self.positions = {kind: sel.positions for kind, sel in selections.items()}
        self.head_index = {kind: None if len(sel.heads) == sel.num_heads else torch.tensor(sel.heads)
                           for kind, sel in selections.items()}
        self.writer = writer
        self.stream = stream
        self.metric_values = metric_values
        self.itemsize = np.dtype(storage.dtype).itemsize
        # A writer that takes whole batches (the packed layout): one call per batch and layer
        # instead of one per text, so the writer thread's Python stays off the forward's cores.
        self.batched = writer is not None and hasattr(writer.target, "begin_batch")
        self.json_item: store.TextAttention | None = None  # a .json run's one item, once complete

    def begin(self, batch: Batch, metrics=None) -> None:
        """A new batch: its items' tokens are written first when streaming."""
        self.batch, self.metrics = batch, metrics
        self.pending: dict[int, list[np.ndarray]] = {}  # text -> converted layers of an unfinished chunk
        self.kept: dict[str, list[list[np.ndarray | None]]] = {
            kind: [[None] * len(sel.layers) for _ in batch.indices] for kind, sel in self.selections.items()
        }
        self.runs = None  # the batch's runs of equal lengths (batched writers), at its first layer
        if self.stream or metrics is not None:
            sel = self.selections["self"]
            if self.batched:
                self.writer.submit("begin_batch", batch.indices, batch.items, len(sel.layers), len(sel.heads))
                return
            for i, item in zip(batch.indices, batch.items, strict=True):
                self.writer.submit("begin", i, item, len(sel.layers), len(sel.heads))

    def _convert(self, crop: torch.Tensor) -> np.ndarray:  # one pass: crop, convert and make contiguous
        return to_storage_values([crop], self.storage.dtype).reshape(crop.shape)

    def _checks_in_writer(self, kind: str, probs: torch.Tensor) -> bool:
        """Whether a batch layer's guards and conversion run in the writer thread (module docstring)."""
        return (self.batched and self.stream and self.metrics is None and self.head_index[kind] is None
                and not self.writer.deferred and probs.device.type == "cpu"
                and 2 * probs.nbytes <= self.writer.max_bytes)

    def layer(self, kind: str, layer: int, probs: torch.Tensor, check) -> None:  # probs (B, H, Q, K)
        """Store one layer once `check()` (its guards; raises on a violation) has passed."""
        in_writer = self._checks_in_writer(kind, probs)
        if not in_writer:
            check()
        pos = self.positions[kind][layer]
        index = self.head_index[kind]
        if index is not None:
            probs = probs.index_select(1, index.to(probs.device))  # (B, H', Q, K)
        batch = self.batch
        if self.metrics is not None:  # computed in the writer thread, on the other core, while the pass runs on
            self.writer.submit(_store_metrics, self.metrics, probs, self.metric_values, batch.indices, pos,
                               nbytes=probs.nbytes)
            return
        q_lengths, k_lengths = batch.lengths[kind]
        if not self.stream:
            for row, (q, k) in enumerate(zip(q_lengths, k_lengths, strict=True)):
                crop = probs[row, :, :q, :k]  # (H', q, k) real tokens only
                if self.storage.rows != "all":
                    first = int(store.query_positions(self.storage.rows, q)[0])
                    crop = crop[:, first:first + 1]  # (H', 1, k)
                self.kept[kind][row][pos] = crop.float().cpu().numpy()
            return
        if self.batched:  # the stored values of every text at once, one text after the other
            if self.runs is None:
                self.runs = equal_runs(q_lengths)
            if in_writer:
                self.writer.submit(_check_and_write, check, probs, self.runs, self.storage.rows, self.storage.dtype,
                                   self.writer.target, batch.indices[0], pos, nbytes=probs.nbytes)
                return
            values = stored_values(probs, self.runs, self.storage.rows, self.storage.dtype)
            self.writer.submit("write_layer", batch.indices[0], pos, values, nbytes=values.nbytes)
            return
        heads = probs.shape[1]
        num_layers = len(self.selections[kind].layers)
        for row, (i, n) in enumerate(zip(batch.indices, q_lengths, strict=True)):
            rows = store.query_positions(self.storage.rows, n)
            layers_per_chunk, step, _, _ = store.chunk_shape(num_layers, heads, len(rows), n, self.itemsize)
            for head in range(0, heads, step):
                crop = probs[row, head:head + step, :n, :n]  # (h, n, n) view, real tokens only
                if self.storage.rows != "all":
                    crop = crop[:, int(rows[0]):int(rows[0]) + 1]  # (h, 1, n)
                converted = self._convert(crop)
                if layers_per_chunk == 1:
                    self.writer.submit("write_chunk", i, pos, head, converted[None], nbytes=converted.nbytes)
                    continue
                # Short texts: several whole layers per chunk (better compression), sent when complete.
                layers = self.pending.setdefault(i, [])
                layers.append(converted)
                if len(layers) == layers_per_chunk:
                    chunk = np.stack(self.pending.pop(i))  # (l, H, r, n)
                    self.writer.submit("write_chunk", i, pos - layers_per_chunk + 1, 0, chunk, nbytes=chunk.nbytes)

    def end(self, extras: list[dict] | None = None) -> None:
        """The batch is complete: streamed items are closed, collected items written whole.

        `extras` adds fields per item (the gradients of --explain; under "target", fields of the
        item's target)."""
        batch = self.batch
        if self.stream or self.metrics is not None:
            if self.batched:
                self.writer.submit("end_batch", batch.indices[0])
                return
            for i in batch.indices:
                self.writer.submit("end", i)
            return
        for row, (i, item) in enumerate(zip(batch.indices, batch.items, strict=True)):
            extra = {} if extras is None else dict(extras[row])
            fields = {"attention": np.stack(self.kept["self"][row])}  # (L, H, r, n)
            if item.target is not None:
                fields["target"] = dataclasses.replace(
                    item.target, decoder_attention=np.stack(self.kept["decoder"][row]),
                    cross_attention=np.stack(self.kept["cross"][row]), **extra.pop("target", {}))
            fields.update(extra)
            complete = dataclasses.replace(item, **fields)
            if self.writer is None:
                self.json_item = complete
            else:
                self.writer.submit("write", i, complete, nbytes=complete.attention.nbytes)
