#!/usr/bin/env python3
"""Draw, prepare or explore attention stored by extract_attention.py (never loads a model).

Examples:
    # one head as a heatmap (rows = query, columns = key), and the frontend JSON
    python visualize_attention.py --input_file attention_data.json --mode plot --layer 0 --head 0 \\
        --output_file attention_vis.png
    python visualize_attention.py --input_file attention_data.json --mode prepare --output_file backend_data.json

    # every head of the last layer; all layers x heads; the mean over heads of every layer
    python visualize_attention.py --input_file attention_data.json --mode heads --layer -1 --output_file heads.svg
    python visualize_attention.py --input_file attention_data.json --mode layers --output_file layers.pdf
    python visualize_attention.py --input_file attention_data.json --mode average --layer all --output-dir figs/

    # encoder-decoder files (T5, BART, Marian): the three translation figures for the last decoder layer
    # (cross_attention_layer{N}.png, cross_attention_multihead_layer{N}.png, self_attention_layer{N}.png)
    python visualize_attention.py --input_file pair.json --mode seq2seq --output-dir figs/
    # any figure mode on the cross-attention (rows = target, columns = source) or decoder attention
    python visualize_attention.py --input_file pair.json --attention cross --mode heads --layer -1 -o cross.png

    # a ViT file (extract_attention.py --image): [CLS] attention of one head / the head mean /
    # the rollout up to layer N, drawn over the image (read from the path stored in the file)
    python visualize_attention.py --input_file vit.h5 --mode image --layer -1 --head rollout \\
        --image cat.png --output_file cat_rollout.png

    # one text of a corpus file, as an offline interactive page
    python visualize_attention.py --input_file results/demo/attention.h5 --text-id news-002 --mode html \\
        --output_file attention_interactive.html
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnpipe.errors import run_cli
from attnpipe.visualize import run as visualize

MODES = ("plot", "heads", "layers", "average", "prepare", "html", "seq2seq", "image")
# File names used with --output-dir (the names the earlier attention tools used, where they had one).
DEFAULT_NAMES = {
    "plot": "attention_vis.{ext}",
    "heads": "attention_heads_{layer}.{ext}",
    "layers": "attention_layers.{ext}",
    "average": "attention_heatmap.{ext}",
    "prepare": "backend_data.json",
    "html": "attention_interactive.html",
    "image": "attention_overlay_layer{layer}.{ext}",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prepared JSON format: docs/prepared.schema.json. Attention files: docs/FORMAT.md.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--input_file", "--input-file", "-i", type=Path, required=True, metavar="FILE",
                        help="an attention file from extract_attention.py (.json or .h5)")
    parser.add_argument("--mode", choices=MODES, default="plot",
                        help="plot: one head; heads: every head of a layer; layers: all layers x heads; "
                        "average: mean over heads; prepare: frontend JSON; html: interactive page; "
                        "seq2seq: the three translation figures of an encoder-decoder file into --output-dir; "
                        "image: a ViT's [CLS] attention over the image (default: plot)")
    pick = parser.add_argument_group("what to show")
    pick.add_argument("--layer", default=None, metavar="N",
                      help="model layer index (default 0; -1 = last); 'all' for heads/average/seq2seq "
                      "modes; with --mode seq2seq a decoder layer (default -1, the last)")
    pick.add_argument("--attention", choices=("encoder", "decoder", "cross"), default="encoder",
                      help="encoder-decoder files: which attention to show: encoder self-attention "
                      "(default), decoder self-attention, or cross-attention (rows = target tokens, "
                      "columns = source tokens; figure modes only)")
    pick.add_argument("--head", default="0", metavar="N",
                      help="model head index for plot mode (default 0; -1 = last); "
                      "image mode also takes 'mean' (over heads) or 'rollout' (layers up to --layer)")
    pick.add_argument("--image", type=Path, default=None, metavar="FILE",
                      help="image mode: the image to draw on (default: the path stored in the file)")
    pick.add_argument("--text-id", "--text_id", default=None, metavar="ID",
                      help="which text of a corpus (.h5) file, by id")
    pick.add_argument("--index", type=int, default=None, metavar="I",
                      help="which text of a corpus file, by position (default 0)")
    pick.add_argument("--tokens", default=None, metavar="A,B,C",
                      help="comma-separated labels replacing the stored tokens (same count)")
    pick.add_argument("--max-tokens", "--max_tokens", type=int, default=None, metavar="N",
                      help="figures show only the first N tokens (stated on the figure); see --tokens-range")
    pick.add_argument("--tokens-range", "--tokens_range", default=None, metavar="A:B",
                      help="figures show tokens A to B-1 (Python slice bounds: 40:80, --tokens-range=-30: for the last 30, "
                      ":20 for the first 20; stated on the figure)")
    pick.add_argument("--hide-special", "--hide_special", action="store_true",
                      help="figures leave out special tokens ([CLS], [SEP], <s>, ...); rows are not "
                      "renormalised (stated on the figure)")
    look = parser.add_argument_group("figure look")
    look.add_argument("--color-scale", "--color_scale", choices=("fixed", "figure", "panel"), default="figure",
                      help="colour limits: figure = 0 to the largest value the figure shows (default), "
                      "fixed = --vmin..--vmax (default 0..1, the same colours in every figure), "
                      "panel = each panel of a grid from 0 to its own largest value (a colour bar each)")
    look.add_argument("--vmin", type=float, default=None, help="lowest colour value (default 0; --log: 0.001)")
    look.add_argument("--vmax", type=float, default=None, help="highest colour value (default: see --color-scale)")
    look.add_argument("--log", action="store_true",
                      help="log colour scale from --vmin (default 0.001: smaller values share the darkest colour)")
    look.add_argument("--title", default=None, help="the figure title (default: model · text id · layer/head)")
    look.add_argument("--font-size", "--font_size", type=float, default=None, metavar="PT",
                      help="token label size in points (default 8 for one heatmap, 6 in grids); "
                      "grids grow with it and thin labels that do not fit (stated on the figure)")
    out = parser.add_argument_group("output")
    out.add_argument("--output_file", "--output-file", "-o", type=Path, default=None, metavar="FILE",
                     help=".png/.svg/.pdf for figures, .json for prepare, .html for html")
    out.add_argument("--output-dir", "--output_dir", type=Path, default=None, metavar="DIR",
                     help="write into DIR (created if missing) with the usual names (attention_vis.png, attention_heads_{layer}.png, "
                     "attention_layers.png, attention_heatmap.png, backend_data.json, attention_interactive.html)")
    out.add_argument("--format", choices=("png", "svg", "pdf"), default="png",
                     help="figure type with --output-dir (default: png)")
    out.add_argument("--dpi", type=int, default=150, help="resolution of PNG figures (default: 150)")
    out.add_argument("--cmap", default="viridis", help="matplotlib colormap (default: viridis)")
    prep = parser.add_argument_group("prepare / html")
    prep.add_argument("--layers", default=None, metavar="0,2,-1",
                      help="model layer indices to include (default: all stored)")
    prep.add_argument("--heads", default=None, metavar="0,5",
                      help="model head indices to include (default: all stored)")
    prep.add_argument("--decimals", type=int, default=None, metavar="D",
                      help="round probabilities to D decimals (default: exact stored values)")
    prep.add_argument("--max-bytes", "--max_bytes", type=int, default=None, metavar="B",
                      help="refuse to write more than B bytes of attention data (default: 50 MB)")
    prep.add_argument("--trim", action="store_true",
                      help="over --max-bytes, keep the (layer, head) pairs that fit instead of failing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    request = visualize.Request(
        input_file=args.input_file, mode=args.mode, head=args.head, attention=args.attention,
        layer=args.layer if args.layer is not None else ("-1" if args.mode == "seq2seq" else "0"),
        text_id=args.text_id, index=args.index,
        tokens=None if args.tokens is None else tuple(args.tokens.split(",")),
        max_tokens=args.max_tokens, output_file=args.output_file, output_dir=args.output_dir,
        names=DEFAULT_NAMES, figure_format=args.format, dpi=args.dpi, cmap=args.cmap,
        layers=args.layers, heads=args.heads, decimals=args.decimals, max_bytes=args.max_bytes,
        trim=args.trim, image=args.image, tokens_range=args.tokens_range, hide_special=args.hide_special,
        color_scale=args.color_scale, vmin=args.vmin, vmax=args.vmax, log=args.log, title=args.title,
        font_size=args.font_size,
    )
    for message in visualize.run(request):
        print(message, file=sys.stderr)
    return 0


def cli() -> int:
    """The installed command (pyproject.toml [project.scripts]): errors as one line, exit 2."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
