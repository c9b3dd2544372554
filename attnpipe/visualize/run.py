"""What visualize_attention.py does, as a function: read one text, make figures / JSON / HTML.

All checks (input file, indices, output paths) happen before anything is drawn or written;
every output is written atomically (attnpipe.visualize.outputs).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import matplotlib as mpl
import numpy as np

from attnpipe.errors import AttnpipeError
from attnpipe.store import Provenance, TextAttention, open_attention, selection
from attnpipe.visualize import plots
from attnpipe.visualize import seq2seq as visualize_seq2seq
from attnpipe.visualize.image import run_image
from attnpipe.store.atomic import check_folder, check_not_an_input
from attnpipe.visualize.outputs import check_output_path, write_text
from attnpipe.visualize.plots import model_name
from attnpipe.visualize.prepare import DEFAULT_MAX_BYTES, dumps, prepare, real_token_count
from attnpipe.visualize.viewer import Panel, page_data, write_html

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
    tokens_range: str | None = None  # figures: "A:B", the token window (instead of --max-tokens)
    hide_special: bool = False  # figures: leave out [CLS], [SEP], <s>, ... (rows not renormalised)
    color_scale: str = "figure"  # fixed | figure | panel
    vmin: float | None = None
    vmax: float | None = None
    log: bool = False
    title: str | None = None  # replaces the automatic title line
    font_size: float | None = None  # token labels, points

    @property
    def style(self) -> plots.Style:
        return plots.Style(colors=plots.Colors(scale=self.color_scale, vmin=self.vmin, vmax=self.vmax, log=self.log),
                           fontsize=self.font_size, title=self.title)

    def view(self, tokens, special) -> plots.View:
        """The token window of a figure axis (special: the per-token mask, used with --hide-special)."""
        return plots.make_view(tokens, self.max_tokens, tokens_range=self.tokens_range,
                               special=special if self.hide_special else None)


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
        check_not_an_input(path, [req.input_file, getattr(req, "image", None)])
    return paths


def _labels(req: Request, item: TextAttention) -> tuple[str, ...]:
    if req.tokens is None:
        return item.tokens
    if len(req.tokens) != item.num_tokens:
        raise AttnpipeError(
            f"--tokens gives {len(req.tokens)} labels but text {item.id!r} has {item.num_tokens} tokens"
        )
    return req.tokens


COLOR_SCALES = ("fixed", "figure", "panel")


def _check_colours(req: Request) -> None:
    if req.color_scale not in COLOR_SCALES:
        raise AttnpipeError(f"--color-scale takes {' / '.join(COLOR_SCALES)}, got {req.color_scale!r}")
    for flag, value in (("--vmin", req.vmin), ("--vmax", req.vmax)):
        if value is not None and not math.isfinite(value):
            raise AttnpipeError(f"{flag} must be a finite number, got {value}")
    if req.vmin is not None and req.vmax is not None and req.vmin >= req.vmax:
        raise AttnpipeError(f"--vmin {req.vmin} must be below --vmax {req.vmax}")
    if req.log and req.vmin is not None and req.vmin <= 0:
        raise AttnpipeError(f"--log needs --vmin above 0 (a log scale has no 0), got {req.vmin}")
    if req.log and req.vmax is not None and req.vmax <= 0:
        raise AttnpipeError(f"--log needs --vmax above 0, got {req.vmax}")
    if req.font_size is not None and not 2 <= req.font_size <= 72:
        raise AttnpipeError(f"--font-size takes 2-72 points, got {req.font_size}")


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
    if req.max_tokens is not None and req.tokens_range is not None:
        raise AttnpipeError("give --max-tokens N or --tokens-range A:B, not both")
    _check_colours(req)
    if req.mode == "image":  # a ViT's [CLS] attention drawn on the image: attnpipe.visualize.image
        yield from run_image(req)
        return
    with open_attention(req.input_file) as attn:
        meta = attn.meta
        source = req.input_file
        item = selection.pick_text(attn, req.text_id, req.index)
    if req.mode == "html":  # the interactive page: every kind of attention the file holds
        yield from _html(req, meta, item, source)
        return
    if req.mode == "seq2seq":  # seed 003's three figures: attnpipe/visualize/seq2seq.py
        yield from visualize_seq2seq.seed003_figures(req, meta, item, model_name(meta))
        return
    # Encoder-decoder files: the decoder side becomes what the modes below draw; cross-attention
    # is rectangular, its key (column) tokens are the source tokens.
    source_item = item
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
    if req.mode == "prepare":
        view = col_view = None
    else:
        view = req.view(labels, item.special_tokens_mask)
        # Cross-attention: the columns are the source tokens, with the source's special mask.
        col_view = None if columns is None else req.view(columns, source_item.special_tokens_mask)
    name = f"{model_name(meta)} · text {item.id}" + (f" · {label}" if label else "")
    heads = list(meta.heads)

    if req.mode == "prepare":
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
        write_text(paths[0], dumps(result.payload) + "\n")
        yield f"wrote {paths[0]} ({len(result.kept)} heads, {item.num_tokens} tokens)"
        return

    attention = item.attention  # (layer, head, query, key), stored positions
    style = req.style
    if req.mode == "plot":
        layer_id, head_id = meta.layers[layer_pos[0]], meta.heads[head_pos]
        title = f"{name} · {plots.head_name(layer_id, head_id)} (layer {layer_id}, head {head_id})"
        figures = [plots.head_figure(attention[layer_pos[0], head_pos], view, title, cmap=req.cmap,
                                     col_view=col_view, style=style)]
    elif req.mode == "heads":
        figures = [plots.heads_figure(attention[lp], view, heads,
                                      f"{name} · layer {meta.layers[lp]} · every head", cmap=req.cmap,
                                      col_view=col_view, layer=meta.layers[lp], style=style)
                   for lp in layer_pos]
    elif req.mode == "layers":
        figures = [plots.layers_figure(attention, view, list(meta.layers), heads,
                                       f"{name} · all layers x heads", cmap=req.cmap, col_view=col_view,
                                       style=style)]
    else:  # average
        means = attention[layer_pos].mean(axis=1)  # (layer, query, key): mean over heads
        if len(layer_pos) == 1:
            title = f"{name} · layer {layer_ids[0]} · mean over {len(heads)} heads"
            figures = [plots.head_figure(means[0], view, title, cmap=req.cmap, col_view=col_view,
                                         style=dataclasses.replace(style, colors=dataclasses.replace(
                                             style.colors, label="mean attention over heads")))]
        else:
            figures = [plots.layer_average_figure(means, view, layer_ids,
                                                  f"{name} · mean over {len(heads)} heads", cmap=req.cmap,
                                                  col_view=col_view, style=style)]
    if columns is None:  # square self-attention of generated text: where the model took over
        for fig in figures:
            plots.mark_generated(fig, item.generated, view)
    for fig, path in zip(figures, paths):
        plots.save_figure(fig, path, dpi=req.dpi)
        yield f"wrote {path}"




def _subset(flag_value: str | None, flag: str, stored: tuple[int, ...], what: str, source: Path) -> list[int]:
    values = None if flag_value is None else selection.parse_index_list(flag_value, flag)
    return selection.positions(values, stored, flag, what, source)


def text_panels(meta: Provenance, item: TextAttention, labels, subset=None) -> list[Panel]:
    """The viewer's panels of one text: its self-attention (encoder self-attention for an
    encoder-decoder), and for encoder-decoder files with a target the decoder and cross-attention.
    `subset(which, values)` gives the positions kept of the stored layers or heads (which =
    "layers" | "heads"; default: all). Used by --mode html and by the Python API's viewer."""
    n = real_token_count(item)  # seed 001's files may carry trailing padding
    subset = subset or (lambda which, values: list(range(len(values))))

    def panel(kind: str, label: str, rows, cols, layers, heads, attention, special, generated) -> Panel:
        lp, hp = subset("layers", layers), subset("heads", heads)
        return Panel(kind=kind, label=label, rows=tuple(map(str, rows)), cols=tuple(map(str, cols)),
                     layers=tuple(layers[p] for p in lp), heads=tuple(heads[p] for p in hp),
                     attention=attention if (len(lp), len(hp)) == attention.shape[:2] and lp == sorted(lp)
                     and hp == sorted(hp) else attention[np.ix_(lp, hp)], special=tuple(bool(x) for x in special),
                     generated=tuple(bool(x) for x in generated))

    # A per-token `generated` flag (added by causal/seq2seq generation) is marked on the page.
    generated = item.generated
    generated = () if generated is None else np.asarray(generated)[:n]
    kind = "encoder" if meta.is_seq2seq else "self"
    panels = [panel(kind, "encoder self-attention" if meta.is_seq2seq else "self-attention",
                    labels[:n], labels[:n], meta.layers, meta.heads, item.attention[:, :, :n, :n],
                    item.special_tokens_mask[:n], generated)]
    if meta.is_seq2seq and item.target is not None:
        target = item.target
        target_generated = target.generated
        target_generated = () if target_generated is None else target_generated
        for kind, label, cols, attention in (
                ("decoder", "decoder self-attention (causal)", target.tokens, target.decoder_attention),
                ("cross", "cross-attention (rows: target, columns: source)", item.tokens, target.cross_attention)):
            panels.append(panel(kind, label, target.tokens, cols, meta.decoder_layers, meta.decoder_heads,
                                attention, target.special_tokens_mask, target_generated))
    return panels


def _html(req: Request, meta: Provenance, item: TextAttention, source: Path) -> Iterator[str]:
    """The viewer page: one panel per kind of attention (encoder, decoder, cross for seq2seq files)."""
    paths = _outputs(req, [0])
    labels = _labels(req, item)

    def subset(which: str, values) -> list[int]:
        return _subset(req.layers if which == "layers" else req.heads, f"--{which}", values, which, source)

    panels = text_panels(meta, item, labels, subset)
    kind = panels[0].kind
    if not (meta.is_seq2seq and item.target is not None) and req.attention != "encoder":
        visualize_seq2seq.select(req.attention, req.mode, meta, item, source)  # raises: not seq2seq
    result = page_data(panels, title=f"{model_name(meta)} · {item.id}", text=item.text,
                       start="self" if kind == "self" else req.attention, cmap=req.cmap,
                       decimals=req.decimals,
                       max_bytes=DEFAULT_MAX_BYTES if req.max_bytes is None else req.max_bytes, trim=req.trim)
    if result.dropped:
        first = result.dropped[0]
        yield (f"warning: --trim kept {len(result.kept)} of {len(result.kept) + len(result.dropped)} "
               f"heads to stay under the byte budget; first dropped: {first[0]} L{first[1]}.H{first[2]}")
    write_html(paths[0], result.data)
    precision = {"f32": "exact float32", "u16": "2 bytes per value", "u8": "1 byte per value"}[result.encoding]
    yield (f"wrote {paths[0]} ({len(result.kept)} heads, {item.num_tokens} tokens, {precision}, "
           f"{result.num_bytes / 1e6:.1f} MB)")
