#!/usr/bin/env python3
"""Analyze stored attention: head metrics, a per-layer summary, rollout, flow, clusters, checkpoints.

Reads the files written by extract_attention.py (.h5 corpus or .json single text) one text at a
time; never loads a model. Metric definitions: docs/METRICS.md.

Examples:
    # per (text, layer, head) metrics + corpus aggregates -> results/demo/metrics/
    python analyze_attention.py metrics results/demo/attention.h5 --output-dir results/demo/metrics

    # only some metrics
    python analyze_attention.py metrics results/demo/attention.h5 --output-dir out --metrics entropy,self

    # the per-layer summary: Avg entropy, Avg max attention, Diagonal strength
    python analyze_attention.py summary results/demo/attention.h5

    # attention rollout (Abnar & Zuidema 2020) from the [CLS] row, heads fused by their mean
    python analyze_attention.py rollout results/demo/attention.h5 --output-dir out --query cls

    # attention flow (max-flow through the layered graph) for the first 5 texts, [CLS] row
    python analyze_attention.py flow results/demo/attention.h5 --output-dir out --max-texts 5

    # head specialisation: each head's role profile, dominant role and its consistency across texts
    python analyze_attention.py specialization results/demo/attention.h5 --output-dir out --layer 2

    # cluster heads by Jensen-Shannon distance (table + MDS figure)
    python analyze_attention.py clusters results/demo/attention.h5 --output-dir out   # --clusters K to fix it

    # the same texts under several checkpoints, in training order
    python analyze_attention.py compare step1k.h5 step2k.h5 final.h5 --output-dir out

    # induction, duplicate- and previous-token heads over training checkpoints of a probe corpus
    python analyze_attention.py circuits run-0.h5 run-250.h5 run-500.h5 --output-dir out \
        --in-context-loss results/induction/models/run/in_context_loss.csv

    # Clark et al. 2019's own conventions (previous token / n, smoothed entropy, summed JS in nats)
    python analyze_attention.py clark results/demo/attention.h5 --output-dir out/clark

    # a Markdown report with figures (several files: checkpoints of the same texts, in order)
    python analyze_attention.py report results/demo/attention.h5 --output-dir results/demo/report

    # files extracted with --explain: A*|dA|, Chefer relevance, head importance; and the
    # faithfulness check (token deletion; the one subcommand that loads the model)
    python analyze_attention.py relevance results/sentiment_grad.h5 --output-dir out/relevance
    python analyze_attention.py faithfulness results/sentiment_grad.h5 --output-dir out/faithfulness
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from attnpipe.analyze import commands
from attnpipe.analyze.parsers import add_attribution_commands, add_common, add_gradient_commands
from attnpipe.errors import run_cli


def cluster_count(text: str) -> int | None:
    """--clusters: a count, or 'auto' (None: chosen by silhouette)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"takes a number of clusters or 'auto', got {text!r}") from err


def build_parser() -> argparse.ArgumentParser:
    from attnpipe.analyze.metrics import METRICS
    from attnpipe.analyze.rollout import HEAD_FUSIONS, QUERY_CHOICES

    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Metric definitions: docs/METRICS.md. Table columns: the .columns.json sidecar.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    metrics = commands.add_parser("metrics", help="per (text, layer, head) metrics and corpus aggregates",
                                  description="Write metrics.parquet/.csv (one row per text x layer x "
                                  "head x metric), aggregate.parquet/.csv (per layer, head, metric: "
                                  "mean, std, bootstrap 95% CI) and metrics.columns.json.")
    add_common(metrics)
    metrics.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                         help="folder for the tables (created if missing)")
    metrics.add_argument("--metrics", default="all", metavar="A,B",
                         help=f"comma-separated metric names, or 'all' (default): {', '.join(METRICS)}")
    metrics.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                         help="bootstrap resamples for the 95%% interval (default: 1000)")
    metrics.add_argument("--seed", type=int, default=0, help="bootstrap random seed (default: 0)")
    metrics.add_argument("--workers", type=int, default=None, metavar="N",
                         help="processes reading and computing the texts (default: one per core)")
    metrics.add_argument("--detectors", action="store_true",
                         help="also the circuit detectors previous_token, duplicate_token and induction "
                         "(by token id; docs/METRICS.md) as metrics of the same tables")

    summary = commands.add_parser("summary", help="a per-layer summary printed to stdout",
                                  description="Per layer: Avg entropy, Avg max attention and Diagonal "
                                  "strength (mean over heads and texts).")
    add_common(summary)

    rollout = commands.add_parser("rollout", help="attention rollout (Abnar & Zuidema 2020) per text",
                                  description="Write rollout.parquet/.csv: text_id, query, key, tokens, "
                                  "value for the chosen query rows of each text's rollout matrix.")
    add_common(rollout, causal=False)
    rollout.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                         help="folder for the tables (created if missing)")
    rollout.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean",
                         help="how a layer's heads are combined (default: mean)")
    rollout.add_argument("--discard-ratio", type=float, default=0.0, metavar="R",
                         help="share of the smallest fused weights per layer set to 0 before mixing "
                         "(as vit-explain does; default: 0)")
    rollout.add_argument("--start-layer", type=int, default=None, metavar="N",
                         help="model index of the first layer multiplied in (default: the first stored)")
    rollout.add_argument("--query", choices=QUERY_CHOICES, default="cls",
                         help="rows kept: cls (position 0), last (last token) or all (default: cls)")

    flow = commands.add_parser("flow", help="attention flow (Abnar & Zuidema 2020): max-flow per text",
                               description="Write flow.parquet/.csv: text_id, query, key, tokens, value "
                               "(flow normalised over keys) and raw_flow, for the chosen query rows. "
                               "Slow: about n max-flow runs per query row (see docs/METRICS.md).")
    add_common(flow, causal=False)
    flow.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                      help="folder for the tables (created if missing)")
    flow.add_argument("--head-fusion", choices=HEAD_FUSIONS, default="mean",
                      help="how a layer's heads are combined (default: mean)")
    flow.add_argument("--start-layer", type=int, default=None, metavar="N",
                      help="model index of the first layer in the graph (default: the first stored)")
    flow.add_argument("--query", choices=QUERY_CHOICES, default="cls",
                      help="output rows computed: cls, last or all (all costs n times more; default: cls)")
    flow.add_argument("--max-texts", type=int, default=None, metavar="N",
                      help="only the first N texts of the file (flow is slow; default: all)")

    special = commands.add_parser("specialization", help="what each head attends to, and how consistently across texts",
                                  description="Write specialization.parquet/.csv (per layer and head: mean "
                                  "weight per role, dominant role, consistency across texts, label) and "
                                  "head_specialization.png.")
    add_common(special)
    special.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                         help="folder for the table and the figure (created if missing)")
    special.add_argument("--layer", type=int, default=None, metavar="N",
                         help="only this model layer (default: every stored layer)")

    clusters = commands.add_parser("clusters", help="cluster heads by Jensen-Shannon distance (Clark et al. 2019)",
                                   description="Write head_distances.parquet/.csv (JS distance between "
                                   "every two heads, mean over texts), clusters.parquet/.csv (MDS x, y and "
                                   "cluster per head) and clusters.png.")
    add_common(clusters, causal=False)
    clusters.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                          help="folder for the tables and the figure (created if missing)")
    clusters.add_argument("--clusters", type=cluster_count, default=None, metavar="K",
                          help="number of clusters cut from the average-linkage tree (default: auto, the "
                          "count in 2-12 with the highest mean silhouette; see docs/METRICS.md)")

    compare = commands.add_parser("compare", help="the same texts under two or more checkpoints",
                                  description="Write checkpoint_distances.parquet/.csv (per head: JS "
                                  "distance to the previous and to the first checkpoint), "
                                  "checkpoint_metrics.parquet/.csv (every metric per checkpoint) and "
                                  "checkpoints.png. Files are taken in the order given.")
    compare.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                         help="two or more attention files of the same texts, in checkpoint order")
    compare.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                         help="folder for the tables and the figure (created if missing)")
    compare.add_argument("--metrics", default="all", metavar="A,B",
                         help="metrics to follow across checkpoints (default: all)")

    report = commands.add_parser("report", help="a Markdown report with figures for one file or checkpoints",
                                 description="Write report.md, entropy_by_layer.png, clusters.png (and "
                                 "checkpoints.png for several files) and the last file's aggregate table. "
                                 "Several files: the same texts under checkpoints, in order.")
    report.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                        help="one attention file, or several checkpoints of the same texts in order")
    report.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                        help="folder for report.md and its figures (created if missing)")
    report.add_argument("--clusters", type=cluster_count, default=None, metavar="K",
                        help="number of head clusters (default: auto, the count in 2-12 with the highest "
                        "mean silhouette; at most the number of heads)")
    report.add_argument("--title", default="Attention report", help="the report's heading")

    circuits = commands.add_parser(
        "circuits", help="previous-token, duplicate-token and induction heads, per checkpoint, and the phase change",
        description="Write detectors.parquet/.csv (per text, layer, head and detector), detector_summary "
        "(mean over texts and a uniform head's score), offsets (attention by relative offset per head), "
        "detectors.png and circuits.md; with several checkpoints of the same probe texts also "
        "head_changes (heads whose attention moved most over the phase change), "
        "changed_heads_offsets.png and, with --in-context-loss, in_context_loss.png.")
    circuits.add_argument("inputs", type=Path, nargs="+", metavar="INPUT",
                          help="one attention file, or checkpoints of the same texts in training order")
    circuits.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                          help="folder for the tables, figures and circuits.md (created if missing)")
    circuits.add_argument("--steps", default=None, metavar="N,N",
                          help="training step of each file (default: N of the checkpoint-N model folder "
                          "each was extracted from; otherwise the file names label the checkpoints)")
    circuits.add_argument("--in-context-loss", type=Path, default=None, metavar="CSV",
                          help="the run's in_context_loss.csv (scripts/train_induction.py): step, "
                          "loss_first, loss_repeat, in_context_loss")
    circuits.add_argument("--top", type=int, default=3, metavar="K",
                          help="heads listed and profiled around the phase change (default: 3)")
    circuits.add_argument("--max-offset", type=int, default=64, metavar="D",
                          help="largest relative offset profiled (default: 64)")
    circuits.add_argument("--title", default="Circuits over training", help="the report's heading")

    clark = commands.add_parser(
        "clark", help="Clark et al. 2019's numbers exactly (their conventions, not ours)",
        description="Write clark_heads.parquet/.csv (per layer and head, averaged over texts: attention "
        "to self, left, right, [CLS], [SEP] and '.'/',' keys divided by n, and their smoothed entropy) and "
        "clark_distances.parquet/.csv (their smoothed JS divergence in nats between every two heads, "
        "summed over rows and texts). docs/METRICS.md lists how each departs from ours.")
    add_common(clark, causal=False)
    clark.add_argument("--output-dir", "--output_dir", type=Path, required=True, metavar="DIR",
                       help="folder for the tables (created if missing)")
    add_gradient_commands(commands)
    add_attribution_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    options = vars(build_parser().parse_args(argv))
    commands.print_outcome(commands.run(options.pop("command"), **options))
    return 0


def cli() -> int:
    """The installed command (pyproject.toml [project.scripts]): errors as one line, exit 2."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
