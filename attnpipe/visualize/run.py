"""What visualize_attention.py does, as a function: read one text, make figures / JSON / HTML.

All checks (input file, indices, output paths) happen before anything is drawn or written;
every output is written atomically (attnpipe.visualize.outputs).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib as mpl

from attnpipe.errors import AttnpipeError
from attnpipe.store import Provenance, TextAttention, open_attention, selection
from attnpipe.visualize import plots
from attnpipe.visualize import seq2seq as visualize_seq2seq
from attnpipe.visualize.image import run_image
from attnpipe.store.atomic import check_folder
from attnpipe.visualize.outputs import check_output_path, write_text
from attnpipe.visualize.plots import model_name
from attnpipe.visualize.prepare import DEFAULT_MAX_BYTES, dumps, prepare
from attnpipe.visualize.viewer import write_html

Mode = Literal["plot", "heads", "layers", "average", "prepare", "html", "seq2seq", "image"]


@dataclass(frozen=True)
class Request:
    input_file: Path
    mode: Mode
    layer: str  # a model index, or "all"
    head: int | str  # an index; image mode also "mean" or "rollout" (other modes take "3" for 3)
    text_id: str | None
    index: int | None
    tokens: tuple[str, ...] | None
    max_tokens: int | None
    output_file: Path | None
    output_dir: Path | None
    names: Mapping[str, str]  # mode -> file name pattern used with output_dir
    figure_format: str = "png"
    dpi: int = 150
    cmap: str = plots.DEFAULT_CMAP
    layers: str | None = None
    heads: str | None = None
    decimals: int | None = None
    max_bytes: int | None = None
    trim: bool = False
    attention: str = "encoder"  # encoder | decoder | cross: which attention of an encoder-decoder file
    image: Path | None = None  # image mode: the picture to draw on (default: the stored path)


def _layer_positions(req: Request, meta: Provenance, source: Path) -> list[int]:
    if req.layer == "all":
        if req.mode not in ("heads", "average", "layers"):
            raise AttnpipeError(f"--layer all is for --mode heads/average, not {req.mode}")
        return list(range(len(meta.layers)))
    try:
        value = int(req.layer)
    except ValueError as err:
        raise AttnpipeError(f"--layer takes an integer or 'all', got {req.layer!r}") from err
    return [selection.position(value, meta.layers, "--layer", "layers", source)]


def _outputs(req: Request, layer_ids: list[int]) -> list[Path]:
    """One output path per figure/file the request makes; checked before any work."""
    kind = {"prepare": "prepare", "html": "html"}.get(req.mode, "figure")
    count = len(layer_ids) if req.mode == "heads" else 1
    if (req.output_file is None) == (req.output_dir is None):
        raise AttnpipeError("give --output_file FILE or --output-dir DIR (one of them)")
    if req.output_file is not None:
        if count > 1:
            raise AttnpipeError(f"--mode heads --layer all makes {count} figures: use --output-dir DIR")
        paths = [req.output_file]
    else:
        check_folder(req.output_dir)  # made when the first output is written
        pattern = req.names[req.mode]
        paths = [req.output_dir / pattern.format(layer=layer_id, ext=req.figure_format)
                 for layer_id in (layer_ids if req.mode == "heads" else layer_ids[:1])]
    for path in paths:
        check_output_path(path, kind)
    return paths


def _labels(req: Request, item: TextAttention) -> tuple[str, ...]:
    if req.tokens is None:
        return item.tokens
    if len(req.tokens) != item.num_tokens:
        raise AttnpipeError(
            f"--tokens gives {len(req.tokens)} labels but text {item.id!r} has {item.num_tokens} tokens"
        )
    return req.tokens


def parse_head(head: int | str, mode: str) -> int:
    """--head outside image mode: an integer model index."""
    try:
        return int(head)
    except ValueError as err:
        raise AttnpipeError(f"--head takes an integer in {mode} mode, got {head!r} "
                            "('mean'/'rollout' are for --mode image)") from err


def run(req: Request) -> Iterator[str]:
    """Carry out `req`; yields one progress message per file written."""
    head = req.head if req.mode == "image" else parse_head(req.head, req.mode)
    if req.cmap not in mpl.colormaps:
        raise AttnpipeError(f"--cmap {req.cmap!r} is not a matplotlib colormap (e.g. viridis, magma, cividis)")
    if req.max_tokens is not None and req.max_tokens < 1:
        raise AttnpipeError(f"--max-tokens must be at least 1, got {req.max_tokens}")
    if req.mode == "image":  # a ViT's [CLS] attention drawn on the image: attnpipe.visualize.image
        yield from run_image(req)
        return
    with open_attention(req.input_file) as attn:
        meta = attn.meta
        source = req.input_file
        item = selection.pick_text(attn, req.text_id, req.index)
    if req.mode == "seq2seq":  # seed 003's three figures: attnpipe/visualize/seq2seq.py
        yield from visualize_seq2seq.seed003_figures(req, meta, item, model_name(meta))
        return
    # Encoder-decoder files: the decoder side becomes what the modes below draw; cross-attention
    # is rectangular, its key (column) tokens are the source tokens.
    meta, item, columns, label = visualize_seq2seq.select(req.attention, req.mode, meta, item, source)
    # Only the indices a mode uses are checked: a file may store e.g. layer 5 alone.
    if req.mode in ("plot", "heads", "average"):
        layer_pos = _layer_positions(req, meta, source)
    else:
        layer_pos = list(range(len(meta.layers)))
    if req.mode == "plot":
        head_pos = selection.position(head, meta.heads, "--head", "heads", source)
    layer_ids = [meta.layers[p] for p in layer_pos]
    paths = _outputs(req, layer_ids)
    labels = _labels(req, item)
    view = plots.make_view(labels, req.max_tokens)
    col_view = None if columns is None else plots.make_view(columns, req.max_tokens)
    name = model_name(meta) + (f" · {label}" if label else "")
    heads = list(meta.heads)

    if req.mode in ("prepare", "html"):
        sub_layers = selection.positions(
            None if req.layers is None else selection.parse_index_list(req.layers, "--layers"),
            meta.layers, "--layers", "layers", source)
        sub_heads = selection.positions(
            None if req.heads is None else selection.parse_index_list(req.heads, "--heads"),
            meta.heads, "--heads", "heads", source)
        result = prepare(item, meta.layers, meta.heads, sub_layers, sub_heads, decimals=req.decimals,
                         max_bytes=DEFAULT_MAX_BYTES if req.max_bytes is None else req.max_bytes,
                         trim=req.trim)
        if req.tokens is not None:
            result.payload["tokens"] = list(labels[:len(result.payload["tokens"])])
        if result.dropped:
            yield (f"warning: --trim kept {len(result.kept)} of {len(result.kept) + len(result.dropped)} "
                   f"(layer, head) pairs to stay under the byte budget; first dropped: "
                   f"layer {result.dropped[0][0]} head {result.dropped[0][1]}")
        if req.mode == "prepare":
            write_text(paths[0], dumps(result.payload) + "\n")
        else:
            write_html(paths[0], result.payload, f"{name} · {item.id}", req.cmap)
        yield f"wrote {paths[0]} ({len(result.kept)} heads, {item.num_tokens} tokens)"
        return

    attention = item.attention  # (layer, head, query, key), stored positions
    if req.mode == "plot":
        title = f"{name} · layer {meta.layers[layer_pos[0]]} · head {meta.heads[head_pos]}"
        fig = plots.head_figure(attention[layer_pos[0], head_pos], view, title, cmap=req.cmap,
                                col_view=col_view)
        figures = [fig]
    elif req.mode == "heads":
        figures = [plots.heads_figure(attention[lp], view, heads,
                                      f"{name} · layer {meta.layers[lp]} · every head", cmap=req.cmap,
                                      col_view=col_view)
                   for lp in layer_pos]
    elif req.mode == "layers":
        figures = [plots.layers_figure(attention, view, list(meta.layers), heads,
                                       f"{name} · all layers x heads", cmap=req.cmap, col_view=col_view)]
    else:  # average
        means = attention[layer_pos].mean(axis=1)  # (layer, query, key): mean over heads
        if len(layer_pos) == 1:
            title = f"{name} · layer {layer_ids[0]} · mean over {len(heads)} heads"
            figures = [plots.head_figure(means[0], view, title, cmap=req.cmap, col_view=col_view)]
        else:
            figures = [plots.layer_average_figure(means, view, layer_ids,
                                                  f"{name} · mean over {len(heads)} heads", cmap=req.cmap,
                                                  col_view=col_view)]
    for fig, path in zip(figures, paths):
        plots.save_figure(fig, path, dpi=req.dpi)
        yield f"wrote {path}"


