"""Attention kept in memory: what `attnpipe.extract(texts)` returns instead of writing a file.

`MemoryStore` is the runner's writer target for an in-memory run (`ExtractConfig(output=None)`):
the runner hands it each complete text (`write`) and the provenance (`finish`), as it hands them
to the HDF5 writer. Once finished it reads like an open `AttentionFile` (`meta`, `ids`, texts by
index or id, `metric_inputs`, `head`), so every analysis runs on it unchanged. Attention is the
float32 probabilities of the pass (what a .json file holds), every query row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store.format import Provenance, Storage, TextAttention
from attnpipe.store.reader import windows_of_texts

MEMORY_PATH = Path("<memory>")  # what messages name as the "file"


class MemoryStore:
    def __init__(self, num_texts: int):
        self.path = MEMORY_PATH
        self.storage = Storage()
        self.partial_rows = False
        self._items: list[TextAttention | None] = [None] * num_texts
        self.meta: Provenance | None = None
        self.ids: tuple[str, ...] = ()

    # --- the runner's side (called from the writer thread, like H5Writer)
    def write(self, index: int, item: TextAttention) -> None:
        self._items[index] = item

    def finish(self, provenance: Provenance) -> None:
        missing = [i for i, item in enumerate(self._items) if item is None]
        if missing:
            raise RuntimeError(f"texts {missing[:5]} were never written")
        self.meta = provenance
        self.ids = tuple(item.id for item in self._items)

    # --- the reader's side (the AttentionFile interface)
    @property
    def metrics_only(self) -> bool:
        return False

    def __len__(self) -> int:
        return len(self.ids)

    def index_of(self, text_id: str) -> int:
        try:
            return self.ids.index(text_id)
        except ValueError as err:
            raise AttnpipeError(f"text id {text_id!r} is not among the {len(self)} extracted texts") from err

    def __getitem__(self, key: int | str) -> TextAttention:
        index = self.index_of(key) if isinstance(key, str) else key
        if not -len(self) <= index < len(self):
            raise AttnpipeError(f"text index {index} is out of range: {len(self)} texts were extracted")
        return self._items[index]

    def metric_inputs(self, key: int | str, to_float32=None) -> tuple[str, tuple[str, ...], np.ndarray, np.ndarray]:
        item = self[key]
        return item.id, item.tokens, item.special_tokens_mask, item.attention

    def iter_metric_inputs(self, indices, to_float32=None, max_values: int = 0):
        """(position in `indices`, id, tokens, special_tokens_mask, attention), as AttentionFile's."""
        for pos, index in enumerate(indices):
            yield (pos, *self.metric_inputs(index, to_float32))

    def metric_windows(self, indices, to_float32=None, max_values: int = 1 << 24):
        """MetricWindows of the given texts, as AttentionFile's (gathered text by text)."""
        return windows_of_texts(self.iter_metric_inputs(indices, to_float32), max_values)

    def storage_order(self) -> np.ndarray:
        return np.arange(len(self))

    in_memory = True  # no file behind it: readers in other processes cannot reopen it (metrics run in-process)

    def head(self, key: int | str, layer: int, head: int) -> np.ndarray:
        """One (query, key) matrix by *stored* layer and head position (as AttentionFile.head)."""
        return self[key].attention[layer, head]

    def corpus_array(self, name: str) -> np.ndarray | None:
        return None

    def __iter__(self) -> Iterator[TextAttention]:
        for index in range(len(self)):
            yield self[index]

    def close(self) -> None:
        pass
