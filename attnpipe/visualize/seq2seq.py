"""Encoder-decoder attention for visualize_attention.py: `--attention decoder|cross` and seed 003's figures.

`select` turns a text of an encoder-decoder file into what the ordinary modes draw: the decoder
self-attention is square (target x target) and goes through every mode; the cross-attention is
rectangular, rows = target (decoder input) tokens, columns = source tokens, and goes through the
figure modes and the html page (seed 001's prepared JSON describes square self-attention and refuses it).

`seed003_figures` writes seed 003's three files for a decoder layer N into a folder:
cross_attention_layer{N} (mean over heads), cross_attention_multihead_layer{N} (every head) and
self_attention_layer{N} (the decoder's self-attention, mean over heads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from attnpipe.visualize import plots
from attnpipe.store import selection
from attnpipe.errors import AttnpipeError
from attnpipe.store.atomic import check_folder
from attnpipe.visualize.outputs import check_output_path
from attnpipe.store import Provenance, TextAttention

AttentionKind = Literal["encoder", "decoder", "cross"]
ATTENTION_KINDS = ("encoder", "decoder", "cross")
SQUARE_ONLY_MODES = ("prepare",)  # seed 001's JSON has one token list for queries and keys
SEED003_NAMES = (  # seed 003's file names, N = decoder layer (model index)
    ("cross_mean", "cross_attention_layer{layer}.{ext}"),
    ("cross_heads", "cross_attention_multihead_layer{layer}.{ext}"),
    ("self_mean", "self_attention_layer{layer}.{ext}"),
)


def _require_seq2seq(meta: Provenance, item: TextAttention, source: Path, what: str) -> None:
    if item.target is None or not meta.is_seq2seq:
        raise AttnpipeError(
            f"{what} needs an encoder-decoder file (t5, bart, marian, extracted with --source/--target); "
            f"{source} holds {meta.model_type!r} attention with no decoder side"
        )


def select(kind: AttentionKind, mode: str, meta: Provenance, item: TextAttention, source: Path
           ) -> tuple[Provenance, TextAttention, tuple[str, ...] | None, str]:
    """(meta, item, key tokens or None when they are the query tokens, title label) for `kind`.

    For decoder and cross-attention the returned meta and item describe the decoder side: its
    stored layers/heads, target tokens as the rows and the chosen attention as `attention`.
    """
    if kind == "encoder":
        return meta, item, None, "encoder" if meta.is_seq2seq else ""
    _require_seq2seq(meta, item, source, f"--attention {kind}")
    target = item.target
    if kind == "cross" and mode in SQUARE_ONLY_MODES:
        raise AttnpipeError(
            f"--mode {mode} shows square self-attention; cross-attention is target x source "
            "(rectangular): use --mode html, plot, heads, layers, average or seq2seq"
        )
    t = target.num_tokens
    decoder_meta = dataclasses.replace(
        meta, layers=meta.decoder_layers, heads=meta.decoder_heads,
        num_layers=meta.decoder_num_layers, num_heads=meta.decoder_num_heads,
    )
    decoder_item = dataclasses.replace(
        item, text=target.text, tokens=target.tokens, token_ids=target.token_ids,
        special_tokens_mask=target.special_tokens_mask,
        offsets=np.full((t, 2), -1, dtype=np.int64),  # decoder inputs are shifted: no character spans
        word_ids=np.full(t, -1, dtype=np.int64),
        truncated=target.truncated, num_tokens_untruncated=target.num_tokens_untruncated,
        attention=target.decoder_attention if kind == "decoder" else target.cross_attention,
        target=None, generated=target.generated, generated_text=None,
    )
    if kind == "decoder":
        return decoder_meta, decoder_item, None, "decoder self-attention"
    return decoder_meta, decoder_item, item.tokens, "cross-attention (rows: target, columns: source)"


def generation_label(meta: Provenance) -> str:
    """How the text was generated, for titles: 'greedy', 'beam search, 4 beams', 'sampled, seed 0'."""
    settings = meta.generation or {}
    strategy = settings.get("strategy", "generated")
    if strategy == "beam":
        return f"beam search, {settings.get('num_beams')} beams"
    if strategy == "sample":
        return f"sampled, seed {settings.get('seed')}"
    return strategy


def seed003_figures(req, meta: Provenance, item: TextAttention, model_name: str) -> Iterator[str]:
    """Seed 003's three figures for the decoder layer(s) `req.layer` into `req.output_dir`."""
    source = req.input_file
    _require_seq2seq(meta, item, source, "--mode seq2seq")
    if req.output_dir is None or req.output_file is not None:
        raise AttnpipeError("--mode seq2seq writes three figures: give --output-dir DIR (not --output_file)")
    check_folder(req.output_dir)  # made when the first output is written
    if req.tokens is not None:
        raise AttnpipeError("--tokens relabels one token list; --mode seq2seq draws source and target tokens")
    layers = meta.decoder_layers
    if req.layer == "all":
        positions = list(range(len(layers)))
    else:
        try:
            value = int(req.layer)
        except ValueError as err:
            raise AttnpipeError(f"--layer takes an integer or 'all', got {req.layer!r}") from err
        positions = [selection.position(value, layers, "--layer", "decoder layers", source)]
    jobs = []
    for lp in positions:
        for key, pattern in SEED003_NAMES:
            path = req.output_dir / pattern.format(layer=layers[lp], ext=req.figure_format)
            check_output_path(path, "figure")
            jobs.append((lp, key, path))

    target = item.target
    rows = req.view(target.tokens, target.special_tokens_mask)  # target (decoder input) tokens
    cols = req.view(item.tokens, item.special_tokens_mask)  # source tokens
    style = req.style
    model_name = f"{model_name} · text {item.id}"
    heads = list(meta.decoder_heads)
    if target.generated is not None:  # a translation the model wrote itself (seed 003's case)
        model_name = f"{model_name} · generated target ({generation_label(meta)})"
    for lp, key, path in jobs:
        layer = f"decoder layer {layers[lp]}"
        if key == "cross_mean":
            fig = plots.head_figure(
                target.cross_attention[lp].mean(axis=0), rows,
                f"{model_name} · cross-attention · {layer}\nmean over {len(heads)} heads",
                cmap=req.cmap, col_view=cols, style=style)
            fig.axes[0].set_ylabel("target (query)")
            fig.axes[0].set_xlabel("source (key)")
        elif key == "cross_heads":
            fig = plots.heads_figure(
                target.cross_attention[lp], rows, heads,
                f"{model_name} · cross-attention · {layer} · every head · rows = target, columns = source",
                cmap=req.cmap, col_view=cols, layer=layers[lp], style=style)
        else:
            fig = plots.head_figure(
                target.decoder_attention[lp].mean(axis=0), rows,
                f"{model_name} · decoder self-attention (causal) · {layer}\nmean over {len(heads)} heads",
                cmap=req.cmap, style=style)
            fig.axes[0].set_ylabel("target (query)")
            fig.axes[0].set_xlabel("target (key)")
        plots.save_figure(fig, path, dpi=req.dpi)
        yield f"wrote {path}"
