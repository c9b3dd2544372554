"""argparse definitions shared by analyze_attention.py's subcommands: the input argument, and the
subcommands on files extracted with --explain (gradients) or --attribution ig. Kept here so that
the CLI stays a thin list of subcommands (tests/test_layout.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from attnpipe.analyze import commands as analyze_commands


def add_common(parser: argparse.ArgumentParser, causal: bool = True) -> None:
    parser.add_argument("input", type=Path, metavar="INPUT",
                        help="an attention file written by extract_attention.py (.h5 or .json)")
    if causal:  # rollout and flow need no choice: invisible keys already carry weight 0
        parser.add_argument("--causal", choices=list(analyze_commands.CAUSAL_CHOICES), default="auto",
                            help="whether queries see only earlier keys: 'auto' (default) infers it "
                            "from the weights above the diagonal, 'yes'/'no' force it")



def add_attribution_commands(commands) -> None:
    """--attribution ig files (Hao et al. 2021), and the flow view of any file (seed 002)."""
    attr = commands.add_parser("attribution", help="head importance and attribution tree (files made with "
                               "--attribution ig)", description=commands_module_doc("run_attribution"))
    sankey = commands.add_parser("sankey", help="Sankey-style flow of attention or attribution across layers, "
                                 "with hubs", description=commands_module_doc("run_sankey"))
    for sub in (attr, sankey):
        add_common(sub, causal=False)
        sub.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                         help="folder for the tables and figures (created if missing)")
        sub.add_argument("--figures", type=int, default=1, metavar="N", help="figures of the first N texts (default: 1)")
        sub.add_argument("--text-id", default=None, metavar="ID", help="draw only this text")
    attr.add_argument("--threshold", type=float, default=0.4, metavar="TAU",
                      help="tree edges: normalised layer attribution above TAU (default: the paper's 0.4)")
    attr.add_argument("--all-edges", action="store_true", help="keep edges that do not reach the root token")
    sankey.add_argument("--values", choices=["attention", "attribution"], default="attention",
                        help="attention (mean over heads, default) or attribution (--attribution ig files)")
    sankey.add_argument("--top-k", type=int, default=2, metavar="K", help="bands per query and layer (default: 2)")
    sankey.add_argument("--hubs", type=int, default=3, metavar="N", help="hubs per layer (default: 3)")
    sankey.add_argument("--max-tokens", type=int, default=None, metavar="N", help="draw the first N tokens only")


def commands_module_doc(name: str) -> str:
    return " ".join(getattr(analyze_commands, name).__doc__.split())


def add_gradient_commands(commands) -> None:
    """Subcommands on files extracted with --explain (attention gradients stored beside attention)."""
    relevance = commands.add_parser(
        "relevance", help="gradient-weighted attention and Chefer et al. 2021 relevance (files made with --explain)",
        description="Write relevance.parquet/.csv (per text, the query row of raw attention, rollout, "
        "A*|dA| and Chefer relevance, and |grad x input|), relevance_<i>.png (the four maps side by "
        "side) and head_importance.csv/.png (mean |d target / d head gate| over the texts).")
    add_common(relevance, causal=False)
    relevance.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                           help="folder for the tables and figures (created if missing)")
    relevance.add_argument("--query", choices=["auto", "cls", "last"], default="auto",
                           help="row of each map kept in the table: auto (default: [CLS] for encoders, "
                           "the last token for causal LMs), cls or last")
    relevance.add_argument("--figures", type=int, default=1, metavar="N",
                           help="draw the maps of the first N texts (default: 1; 0 = none)")
    relevance.add_argument("--text-id", default=None, metavar="ID", help="draw only this text's maps")
    relevance.add_argument("--max-tokens", type=int, default=None, metavar="N",
                           help="figures show the first N tokens only")

    faith = commands.add_parser(
        "faithfulness", help="token-deletion check of raw attention, rollout, flow, A*|dA| and Chefer "
        "relevance (loads the model)",
        description="Delete tokens in order of each method's scores, re-run the model and record the "
        "drop in the target (perturbation curve, AOPC); Spearman correlation with |grad x input|. "
        "Writes faithfulness.parquet/.csv/.md, perturbation_curves.parquet/.csv/.png. Protocol: "
        "attnpipe/analyze/faithfulness.py and docs/METRICS.md.")
    add_common(faith, causal=False)
    faith.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                       help="folder for the tables and the figure (created if missing)")
    faith.add_argument("--model_dir", "--model-dir", type=Path, default=None, metavar="DIR",
                       help="the model the file was extracted with (default: the folder recorded in the file)")
    faith.add_argument("--max-texts", type=int, default=None, metavar="N",
                       help="only the first N texts (flow is slow on long texts; default: all)")
    faith.add_argument("--no-flow", action="store_true", help="leave attention flow out (it is slow)")
    faith.add_argument("--seed", type=int, default=0, help="seed of the random baseline (default: 0)")
    faith.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps", "auto"],
                       help="where to run the model (default: cpu)")
