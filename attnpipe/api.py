"""The Python API behind `attnpipe.open` and `attnpipe.extract` (re-exported by attnpipe/__init__).

    import attnpipe
    corpus = attnpipe.open("results/demo/attention/demo/minilm.h5")   # or a .json file
    text = corpus["news-002"]                  # by id, or corpus[0] by position
    text.tokens, text.token_ids                # the real tokens and their ids
    text.attention(layer=5, head=3)            # (query, key) matrix, MODEL layer/head indices
    text.to_xarray()                           # DataArray (layer, head, query, key)
    corpus.metrics()                           # long DataFrame: text_id, layer, head, metric, value

    texts = attnpipe.extract(["The cat sat on the mat."])   # in memory, the CLI's one runner
    texts[0].attention(0, 0)

`Attention` (a corpus) and `Text` (one text) read the same way whether they come from a file or
from memory. Layer and head arguments are model indices, as on the command line; negative values
count from the end of what is stored. In Jupyter, a `Text` shows the HTML viewer inline and an
`Attention` a summary table.
"""

from __future__ import annotations

import html
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store import selection
from attnpipe.store.format import Provenance, TextAttention
from attnpipe.store.reader import AttentionFile, open_attention

DIMS = ("layer", "head", "query", "key")
# Inline viewer in a notebook: the payload is capped (heads kept in order while they fit) so a
# long text does not put tens of MB into the notebook file; the CLI's --mode html has no cap.
REPR_HTML_MAX_BYTES = 5_000_000
REPR_HTML_DECIMALS = 4


class Text:
    """One text of an attention file (or of an in-memory extraction)."""

    def __init__(self, item: TextAttention, meta: Provenance, source: object):
        self.item = item  # the store record: every stored field (offsets, word ids, gradients, ...)
        self.meta = meta
        self._source = source

    id = property(lambda self: self.item.id)
    text = property(lambda self: self.item.text)
    tokens = property(lambda self: self.item.tokens)
    token_ids = property(lambda self: self.item.token_ids)
    special_tokens_mask = property(lambda self: self.item.special_tokens_mask)
    layers = property(lambda self: self.meta.layers)  # model indices of the stored layers
    heads = property(lambda self: self.meta.heads)  # model indices of the stored heads

    def __len__(self) -> int:
        return self.item.num_tokens

    def __repr__(self) -> str:
        return (f"<attnpipe.Text {self.id!r}: {len(self)} tokens, {len(self.layers)} layer(s) x "
                f"{len(self.heads)} head(s) of {self.meta.model_type}>")

    def attention(self, layer: int | None = None, head: int | None = None) -> np.ndarray:
        """The attention by model indices: (query, key) for a layer and a head; (head, query, key)
        for a layer; (layer, head, query, key) for neither. float32, rows sum to 1."""
        out = self.item.attention
        if layer is not None:
            out = out[selection.position(layer, self.layers, "layer", "layers", self._source)]
            if head is not None:
                return out[selection.position(head, self.heads, "head", "heads", self._source)]
            return out
        if head is not None:
            return out[:, selection.position(head, self.heads, "head", "heads", self._source)]
        return out

    def to_xarray(self):
        """The whole text as an xarray.DataArray with dims (layer, head, query, key).

        Coordinates: `layer`, `head` = model indices; `query`, `key` = token positions, with the
        token strings as `query_token`, `key_token` (a token can occur twice, a position cannot).
        """
        import xarray as xr

        attention = self.item.attention
        rows = self.item.query_positions
        query = np.arange(attention.shape[2]) if rows is None else np.asarray(rows)
        tokens = np.asarray(self.tokens, dtype=object)
        return xr.DataArray(
            attention, dims=DIMS, name="attention",
            coords={"layer": list(self.layers), "head": list(self.heads), "query": query,
                    "key": np.arange(attention.shape[3]), "query_token": ("query", tokens[query]),
                    "key_token": ("key", tokens)},
            attrs={"text_id": self.id, "text": self.text, "model": self.meta.model,
                   "model_type": self.meta.model_type, "dtype": self.meta.dtype},
        )

    def metrics(self, metrics: Sequence[str] | None = None):
        """This text's per-head metrics (docs/METRICS.md) as a long DataFrame."""
        from attnpipe.analyze.metrics import text_metrics

        return text_metrics(self.item, self.layers, self.heads, metrics=metrics)

    def html(self, title: str | None = None) -> str:
        """The self-contained HTML viewer page of this text (as `visualize_attention.py --mode html`)."""
        from attnpipe.visualize.run import text_panels
        from attnpipe.visualize.viewer import page_data, render_html

        if self.item.query_positions is not None:
            raise AttnpipeError(f"{self._source} keeps only some query rows (--rows); the viewer needs whole matrices")
        page = page_data(text_panels(self.meta, self.item, self.item.tokens),
                         title=title or f"{self.meta.model_type} · {self.id}", text=self.item.text,
                         start="encoder" if self.meta.is_seq2seq else "self", decimals=REPR_HTML_DECIMALS,
                         max_bytes=REPR_HTML_MAX_BYTES, trim=True)
        return render_html(page.data)

    def _repr_html_(self) -> str:
        # The page runs in a sandboxed frame of its own (scripts only, no access to the notebook);
        # srcdoc holds it escaped, so no token string can leave the attribute.
        page = html.escape(self.html(), quote=True)
        height = min(900, 420 + 14 * len(self))
        return (f'<iframe sandbox="allow-scripts" style="width:100%;height:{height}px;border:0" '
                f'srcdoc="{page}"></iframe>')


class Attention:
    """A corpus of texts: an attention file (.h5, .json) opened for reading, or the result of
    `attnpipe.extract`. Texts by id or position: `corpus["news-002"]`, `corpus[0]`."""

    def __init__(self, source: AttentionFile | object):
        self._file = source  # AttentionFile, or store.MemoryStore (the same reading interface)

    meta = property(lambda self: self._file.meta)  # provenance: model, weights hash, versions, ...
    ids = property(lambda self: self._file.ids)
    layers = property(lambda self: self._file.meta.layers)
    heads = property(lambda self: self._file.meta.heads)
    path = property(lambda self: self._file.path)

    def __len__(self) -> int:
        return len(self._file)

    def __getitem__(self, key: int | str) -> Text:
        if not isinstance(key, (int, np.integer, str)):
            raise TypeError(f"texts are looked up by id (str) or position (int), not {type(key).__name__}")
        return Text(self._file[key if isinstance(key, str) else int(key)], self.meta, self._file.path)

    def __iter__(self) -> Iterator[Text]:
        for index in range(len(self)):
            yield self[index]

    def __repr__(self) -> str:
        return (f"<attnpipe.Attention {self.path}: {len(self)} text(s), {len(self.layers)} layer(s) x "
                f"{len(self.heads)} head(s) of {self.meta.model_type}>")

    def attention(self, text: int | str, layer: int, head: int) -> np.ndarray:
        """One (query, key) matrix by model layer/head indices, reading only its own chunk."""
        layer_pos = selection.position(layer, self.layers, "layer", "layers", self.path)
        head_pos = selection.position(head, self.heads, "head", "heads", self.path)
        return self._file.head(text, layer_pos, head_pos)

    def metrics(self, metrics: Sequence[str] | None = None, *, workers: int | None = None):
        """Per (text, layer, head) metrics (docs/METRICS.md) as a long pandas DataFrame: text_id,
        layer, head (model indices), metric, value. A --metrics-only file gives its stored ones."""
        if self._file.metrics_only:
            return self._file.stored_metrics(None if metrics is None else tuple(metrics))
        from attnpipe.analyze.metrics import corpus_metrics

        in_memory = not isinstance(self._file, AttentionFile)  # worker processes would reopen a path
        return corpus_metrics(self._file, metrics=metrics, workers=1 if in_memory else workers)

    def _repr_html_(self) -> str:
        meta = self.meta
        rows = [("source", str(self.path)), ("texts", str(len(self))),
                ("model", f"{meta.model} ({meta.model_type})"),
                ("layers", selection.describe(meta.layers) + f" of {meta.num_layers}"),
                ("heads", selection.describe(meta.heads) + f" of {meta.num_heads}"),
                ("dtype", meta.dtype), ("first ids", ", ".join(self.ids[:5]) + (" ..." if len(self) > 5 else ""))]
        body = "".join(f"<tr><th style='text-align:left'>{html.escape(k)}</th><td style='text-align:left'>"
                       f"{html.escape(v)}</td></tr>" for k, v in rows)
        return f"<table><caption>attnpipe attention</caption>{body}</table>"

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Attention:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open(path: Path | str, *, partial_rows: bool = False) -> Attention:
    """Open an attention file (.h5 or .json) written by extract_attention.py or the workflow."""
    return Attention(open_attention(path, partial_rows=partial_rows))


def extract(texts: str | Sequence[str] | Path, model: Path | str | None = None, *,
            layers: str | Sequence[int] = "all", heads: str | Sequence[int] = "all",
            max_length: int | None = None, batch_size: int | None = None, device: str = "cpu",
            verify: bool = False, threads: int | None = None, trust_remote_code: bool = False) -> Attention:
    """Run the extraction in memory, writing no file: the same runner, guards and ids as
    extract_attention.py (texts: ids text-0, text-1, ...; a Path: a corpus file's own ids).

    model: a transformers model folder; None = the packaged all-MiniLM-L6-v2."""
    from attnpipe.extract import corpus
    from attnpipe.extract.batching import DEFAULT_BATCH_SIZE
    from attnpipe.extract.runner import ExtractConfig
    from attnpipe.extract.runner import extract as run_extraction

    if isinstance(texts, Path):
        items = corpus.read_texts_file(texts)
    elif isinstance(texts, str):
        items = corpus.from_strings([texts])
    else:
        items = corpus.from_strings(list(texts))

    def indices(value: str | int | Sequence[int]) -> tuple[str, ...]:  # as the CLI's --layer / --heads take them
        if isinstance(value, str):
            return (value,)
        return (str(int(value)),) if isinstance(value, (int, np.integer)) else tuple(str(int(v)) for v in value)

    config = ExtractConfig(texts=tuple(items), output=None, model_dir=None if model is None else Path(model),
                           layers=indices(layers), heads=indices(heads), device=device,
                           batch_size=DEFAULT_BATCH_SIZE if batch_size is None else batch_size,
                           max_length=max_length, verify=verify, threads=threads, progress=False,
                           trust_remote_code=trust_remote_code)
    return Attention(run_extraction(config).memory)


__all__ = ["Attention", "Text", "extract", "open"]