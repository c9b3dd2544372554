#!/usr/bin/env python3
"""Analyze stored attention: head metrics, seed 000's summary, rollout, flow, clusters, checkpoints.

Reads the files written by extract_attention.py (.h5 corpus or .json single text) one text at a
time; never loads a model. Metric definitions: docs/METRICS.md.

Examples:
    # per (text, layer, head) metrics + corpus aggregates -> results/demo/metrics/
    python analyze_attention.py metrics results/demo/attention.h5 --output-dir results/demo/metrics

    # only some metrics
    python analyze_attention.py metrics results/demo/attention.h5 --output-dir out --metrics entropy,self

    # seed 000's summary: Avg entropy, Avg max attention, Diagonal strength per layer
    python analyze_attention.py summary results/demo/attention.h5

    # attention rollout (Abnar & Zuidema 2020) from the [CLS] row, heads fused by their mean
    python analyze_attention.py rollout results/demo/attention.h5 --output-dir out --query cls

    # attention flow (max-flow through the layered graph) for the first 5 texts, [CLS] row
    python analyze_attention.py flow results/demo/attention.h5 --output-dir out --max-texts 5

    # head specialisation: each head's role profile, dominant role and its consistency across texts
    python analyze_attention.py specialization results/demo/attention.h5 --output-dir out --layer 2

    # cluster heads by Jensen-Shannon distance (table + MDS figure)
    python analyze_attention.py clusters results/demo/attention.h5 --output-dir out --clusters 6

    # the same texts under several checkpoints, in training order
    python analyze_attention.py compare step1k.h5 step2k.h5 final.h5 --output-dir out

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

from attnpipe.errors import AttnpipeError, run_cli

CAUSAL_CHOICES = {"auto": None, "yes": True, "no": False}


def add_common(parser: argparse.ArgumentParser, causal: bool = True) -> None:
    parser.add_argument("input", type=Path, metavar="INPUT",
                        help="an attention file written by extract_attention.py (.h5 or .json)")
    if causal:  # rollout and flow need no choice: invisible keys already carry weight 0
        parser.add_argument("--causal", choices=list(CAUSAL_CHOICES), default="auto",
                            help="whether queries see only earlier keys: 'auto' (default) infers it "
                            "from the weights above the diagonal, 'yes'/'no' force it")


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
                                  "mean, std, bootstrap 95%% CI) and metrics.columns.json.")
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

    summary = commands.add_parser("summary", help="seed 000's per-layer summary printed to stdout",
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
                         "(seed 004; default: 0)")
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
    clusters.add_argument("--clusters", type=int, default=6, metavar="K",
                          help="number of clusters cut from the average-linkage tree (default: 6)")

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
    report.add_argument("--clusters", type=int, default=6, metavar="K",
                        help="number of head clusters (default: 6, at most the number of heads)")
    report.add_argument("--title", default="Attention report", help="the report's heading")
    add_gradient_commands(commands)
    return parser


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


def parse_metric_names(text: str) -> tuple[str, ...]:
    from attnpipe.analyze.metrics import METRICS, check_metric_names

    if text.strip() == "all":
        return tuple(METRICS)
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise AttnpipeError("--metrics is empty: give names such as entropy,self or 'all'")
    return check_metric_names(names)


def provenance_summary(path: Path, meta) -> dict:
    return {"input": str(path), "model": meta.model, "model_type": meta.model_type,
            "weights_sha256": meta.weights_sha256, "layers": list(meta.layers), "heads": list(meta.heads),
            "dtype": meta.dtype}


def stored_metrics(f, names: tuple[str, ...], causal: bool | None):
    """The long table of a --metrics-only file; refuses a --causal that differs from the stored one."""
    long = f.stored_metrics(names)
    stored = set(bool(c) for c in f.stored_causal())
    if causal is not None and stored and stored != {causal}:
        raise AttnpipeError(f"{f.path} holds metrics computed with causal={sorted(stored)}; --causal "
                            f"{'yes' if causal else 'no'} would need the matrices: extract without --metrics-only")
    return long


def run_metrics(args) -> int:
    from attnpipe.analyze import metrics as M
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    from attnpipe.analyze.fast_metrics import corpus_metrics

    names = parse_metric_names(args.metrics)
    if args.workers is not None and args.workers < 1:
        raise AttnpipeError(f"--workers must be at least 1, got {args.workers}")
    if args.bootstrap < 1:
        raise AttnpipeError(f"--bootstrap must be at least 1, got {args.bootstrap}")
    folder = tables.prepare_output_dir(args.output_dir)
    with open_attention(args.input) as f:
        if f.metrics_only:  # extracted with --metrics-only: the table is stored, return it
            long = stored_metrics(f, names, CAUSAL_CHOICES[args.causal])
        else:
            long = corpus_metrics(f, causal=CAUSAL_CHOICES[args.causal], metrics=names, workers=args.workers)
        source = provenance_summary(args.input, f.meta)
    agg = M.aggregate(long, resamples=args.bootstrap, seed=args.seed)
    written = tables.write_table(long, folder, "metrics") + tables.write_table(agg, folder, "aggregate")
    sidecar = {
        "source": source,
        "definitions": "docs/METRICS.md",
        "metrics": {name: {"unit": M.METRICS[name].unit, "definition": M.METRICS[name].description}
                    for name in names},
        "thresholds": {"SPARSITY_THRESHOLD": M.SPARSITY_THRESHOLD, "LOCAL_WINDOW": M.LOCAL_WINDOW,
                       "LOCAL_LABEL_THRESHOLD": M.LOCAL_LABEL_THRESHOLD},
        "tables": {
            "metrics": {
                "text_id": "id of the text in the attention file",
                "layer": "model layer index (0 = first layer)",
                "head": "model head index within the layer",
                "metric": "metric name (see 'metrics')",
                "value": "mean over query rows of the per-row value; NaN when no row defines it",
            },
            "aggregate": {
                "layer": "model layer index", "head": "model head index", "metric": "metric name",
                "n_texts": "texts with a finite value",
                "mean": "mean over texts", "std": "sample standard deviation over texts (ddof 1)",
                "ci_low": f"{M.CONFIDENCE:.0%} percentile bootstrap interval of the mean, lower end "
                          f"({args.bootstrap} resamples of texts, seed {args.seed})",
                "ci_high": "upper end of the same interval",
                "label": "positional label on local_share rows: 'local' if mean >= "
                         f"{M.LOCAL_LABEL_THRESHOLD}, else 'global'; empty for other metrics",
            },
        },
    }
    written.append(tables.write_json(sidecar, folder / "metrics.columns.json"))
    print(f"wrote {long['text_id'].nunique()} text(s) x {len(names)} metric(s): "
          + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_summary(args) -> int:
    from attnpipe.analyze import metrics as M
    from attnpipe.store import open_attention

    from attnpipe.analyze.fast_metrics import corpus_metrics

    names = tuple(M.SUMMARY_COLUMNS.values())
    with open_attention(args.input) as f:
        long = corpus_metrics(f, causal=CAUSAL_CHOICES[args.causal], metrics=names)
        meta, count = f.meta, len(f)
    table = M.layer_summary(long)
    print(f"Attention Analysis: {args.input} ({meta.model_type}, {count} text(s))")
    print(f"  Layers with attention: {len(table)}")
    for layer, row in table.iterrows():
        print(f"  layer {layer}:")
        print(f"    - Num heads: {int(row['num_heads'])}")
        for label in M.SUMMARY_COLUMNS:
            print(f"    - {label}: {row[label]:.3f}")
    return 0


def run_rollout(args) -> int:
    from attnpipe.analyze import rollout as R
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    if not 0.0 <= args.discard_ratio < 1.0:
        raise AttnpipeError(f"--discard-ratio {args.discard_ratio} is out of range: use a value in [0, 1)")
    folder = tables.prepare_output_dir(args.output_dir)
    with open_attention(args.input) as f:
        table = R.corpus_rollout(f, head_fusion=args.head_fusion, discard_ratio=args.discard_ratio,
                                 start_layer=args.start_layer, query=args.query)
    written = tables.write_table(table, folder, "rollout")
    print(f"wrote rollout of {table['text_id'].nunique()} text(s): "
          + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_flow(args) -> int:
    import pandas as pd

    from attnpipe.analyze import flow as F
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    if args.max_texts is not None and args.max_texts < 1:
        raise AttnpipeError(f"--max-texts must be at least 1, got {args.max_texts}")
    folder = tables.prepare_output_dir(args.output_dir)
    with open_attention(args.input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{args.input} holds no texts")
        count = len(f) if args.max_texts is None else min(args.max_texts, len(f))
        table = pd.concat([F.text_flow(f[index], f.meta.layers, head_fusion=args.head_fusion,
                                       start_layer=args.start_layer, query=args.query)
                           for index in range(count)], ignore_index=True)
    written = tables.write_table(table, folder, "flow")
    print(f"wrote attention flow of {count} text(s): " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def save_figure(draw, path: Path, **kw) -> Path:
    """Create a figure, let `draw(ax)` fill it, save it atomically, close it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnpipe.analyze import tables

    plt.rcParams["text.parse_math"] = False  # token strings such as "$x$" must not become mathtext
    fig, ax = plt.subplots(figsize=kw.get("figsize", (6, 4)), layout="constrained")
    try:
        draw(ax)
        tables.write_atomic(path, lambda tmp: fig.savefig(tmp, format=path.suffix[1:], dpi=150))
    finally:
        plt.close(fig)
    return path


def run_specialization(args) -> int:
    from attnpipe.visualize import analysis_plots
    from attnpipe.analyze import metrics as M
    from attnpipe.analyze import tables
    from attnpipe.analyze.specialization import ROLES, specialization
    from attnpipe.store import open_attention

    folder = tables.prepare_output_dir(args.output_dir)
    with open_attention(args.input) as f:
        if args.layer is not None and args.layer not in f.meta.layers:
            raise AttnpipeError(f"--layer {args.layer} is not stored in {args.input}; "
                                f"stored layers: {', '.join(map(str, f.meta.layers))}")
        long = M.corpus_metrics(f, causal=CAUSAL_CHOICES[args.causal], metrics=ROLES)
    if args.layer is not None:
        long = long[long["layer"] == args.layer]
    table = specialization(long)
    written = tables.write_table(table, folder, "specialization")
    height = max(4.0, 0.16 * len(table) + 1.5)
    written.append(save_figure(lambda ax: analysis_plots.role_profiles(ax, table),
                               folder / "head_specialization.png", figsize=(7, height)))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_clusters(args) -> int:
    from attnpipe.visualize import analysis_plots
    from attnpipe.analyze import clustering as C
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    folder = tables.prepare_output_dir(args.output_dir)
    with open_attention(args.input) as f:
        distances, heads = C.corpus_head_distances(f)
    table = C.cluster_table(distances, heads, args.clusters)
    written = tables.write_table(C.distance_table(distances, heads), folder, "head_distances")
    written += tables.write_table(table, folder, "clusters")
    written.append(save_figure(lambda ax: analysis_plots.head_embedding(ax, table), folder / "clusters.png",
                               figsize=(7, 6)))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_compare(args) -> int:
    from contextlib import ExitStack

    from attnpipe.visualize import analysis_plots
    from attnpipe.analyze import compare as C
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    names = parse_metric_names(args.metrics)
    if len(args.inputs) < 2:
        raise AttnpipeError("compare needs at least two attention files (checkpoints of the same texts)")
    folder = tables.prepare_output_dir(args.output_dir)
    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(path)) for path in args.inputs]
        distances = C.checkpoint_distances(files)
        by_checkpoint = C.metrics_by_checkpoint(files, metrics=names)
    written = tables.write_table(distances, folder, "checkpoint_distances")
    written += tables.write_table(by_checkpoint, folder, "checkpoint_metrics")
    written.append(save_figure(lambda ax: analysis_plots.change_by_checkpoint(ax, distances),
                               folder / "checkpoints.png"))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_report(args) -> int:
    from contextlib import ExitStack

    from attnpipe.visualize import analysis_plots
    from attnpipe.analyze import tables
    from attnpipe.analyze import clustering as CL
    from attnpipe.analyze import compare as CP
    from attnpipe.analyze import metrics as M
    from attnpipe.analyze.report import markdown_report
    from attnpipe.store import open_attention

    folder = tables.prepare_output_dir(args.output_dir)
    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(path)) for path in args.inputs]
        latest = files[-1]  # checkpoints come in training order: describe the newest one
        long = M.corpus_metrics(latest)
        distances, heads = CL.corpus_head_distances(latest)
        checkpoints = CP.checkpoint_distances(files) if len(files) > 1 else None
        sources = [{**provenance_summary(path, f.meta), "num_texts": len(f)}
                   for path, f in zip(args.inputs, files, strict=True)]
    agg = M.aggregate(long)
    clusters = CL.cluster_table(distances, heads, min(args.clusters, len(heads)))
    written = tables.write_table(agg, folder, "aggregate")
    figures = {"Entropy by layer": "entropy_by_layer.png", "Head clusters (MDS of JS distances)": "clusters.png"}
    written.append(save_figure(lambda ax: analysis_plots.metric_by_layer(ax, agg, "entropy"),
                               folder / "entropy_by_layer.png"))
    written.append(save_figure(lambda ax: analysis_plots.head_embedding(ax, clusters), folder / "clusters.png",
                               figsize=(7, 6)))
    if checkpoints is not None:
        figures["Change across checkpoints"] = "checkpoints.png"
        written.append(save_figure(lambda ax: analysis_plots.change_by_checkpoint(ax, checkpoints),
                                   folder / "checkpoints.png"))
    text = markdown_report(args.title, sources, M.layer_summary(long), agg, clusters, checkpoints, figures)
    written.append(tables.write_atomic(folder / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_relevance(args) -> int:
    import numpy as np
    import pandas as pd

    from attnpipe.visualize import plots
    from attnpipe.analyze import relevance as RV
    from attnpipe.visualize import relevance_plots
    from attnpipe.analyze import tables
    from attnpipe.store import open_attention

    if args.figures < 0:
        raise AttnpipeError(f"--figures must be 0 or more, got {args.figures}")
    folder = tables.prepare_output_dir(args.output_dir)
    written = []
    with open_attention(args.input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{args.input} holds no texts")
        layers = f.meta.layers
        table = pd.concat([RV.text_relevance(item, layers, args.query, f.meta.model_type) for item in f],
                          ignore_index=True)
        drawn = [f.index_of(args.text_id)] if args.text_id is not None else range(min(args.figures, len(f)))
        for index in drawn:
            item = f[index]
            fig = relevance_plots.maps_figure(RV.maps(item, layers), item.tokens,
                                              f"{item.id}: target {f.meta.gradient_target}", args.max_tokens)
            path = folder / f"relevance_{index}.png"
            plots.save_figure(fig, path)
            written.append(path)
        importance = f.corpus_array("head_importance_mean")
        if importance is None:  # a JSON file: the one text's importance
            importance = f[0].head_importance
        ablation = f.corpus_array("head_ablation_mean")
        if ablation is None and f[0].head_ablation is not None and len(f) == 1:
            ablation = f[0].head_ablation
        num_layers, num_heads = importance.shape
        heads = pd.DataFrame({
            "layer": np.repeat(np.arange(num_layers), num_heads),
            "head": np.tile(np.arange(num_heads), num_layers),
            "importance_mean": importance.ravel(),
            **({"ablation_mean": ablation.ravel()} if ablation is not None else {}),
        })
    written += tables.write_table(table, folder, "relevance")
    written += tables.write_table(heads, folder, "head_importance")
    written.append(save_figure(
        lambda ax: relevance_plots.head_importance(ax, importance, list(range(num_layers)),
                                                   "mean |d target / d head gate|"),
        folder / "head_importance.png", figsize=(7, 4)))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def run_faithfulness(args) -> int:
    from attnpipe.analyze import faithfulness as FF
    from attnpipe.visualize import relevance_plots
    from attnpipe.analyze import tables
    from attnpipe.extract.gradients import build_objective, parse_target
    from attnpipe.extract.loading import load_model, resolve_device
    from attnpipe.store import open_attention

    if args.max_texts is not None and args.max_texts < 1:
        raise AttnpipeError(f"--max-texts must be at least 1, got {args.max_texts}")
    folder = tables.prepare_output_dir(args.output_dir)
    methods = tuple(m for m in FF.METHODS if not (args.no_flow and m == "flow"))
    with open_attention(args.input) as f:
        if f.meta.gradient_target is None:
            raise AttnpipeError(f"{args.input} holds no gradients: extract it with --explain")
        if len(f) == 0:
            raise AttnpipeError(f"{args.input} holds no texts")
        model_dir = args.model_dir if args.model_dir is not None else Path(f.meta.model)
        device = resolve_device(args.device)
        model = load_model(model_dir, device)
        if model.weights_sha256 != f.meta.weights_sha256:
            raise AttnpipeError(f"{model_dir} is not the model {args.input} was extracted with (weights differ)")

        def encode(text):
            import torch

            return torch.tensor([model.tokenizer(text)["input_ids"]], device=device)

        objective = build_objective(model, parse_target(f.meta.gradient_target), encode)
        summary, curve = FF.corpus_faithfulness(f, model, objective, methods, args.max_texts, args.seed)
    protocol = summary.attrs["protocol"]
    written = tables.write_table(summary, folder, "faithfulness")
    written += tables.write_table(curve, folder, "perturbation_curves")
    text = (f"Target: {f.meta.gradient_target}; {int(summary['texts'].iloc[0])} text(s); deleted tokens "
            f"{'replaced by the mask token' if protocol == 'mask' else 'removed'}; fractions "
            f"{', '.join(map(str, FF.FRACTIONS))}.\n\n" + FF.markdown_table(summary) + "\n")
    written.append(tables.write_atomic(folder / "faithfulness.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    written.append(save_figure(lambda ax: relevance_plots.perturbation_curves(ax, curve),
                               folder / "perturbation_curves.png", figsize=(6, 4)))
    print(text)
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"metrics": run_metrics, "summary": run_summary, "rollout": run_rollout, "flow": run_flow,
                "clusters": run_clusters, "specialization": run_specialization, "compare": run_compare, "report": run_report,
                "relevance": run_relevance, "faithfulness": run_faithfulness}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
