"""A Markdown report from analysis tables: pure text building, no file or model access.

Sections: provenance, per-layer summary (seed 000), most focused heads, positional heads,
special-token heads, head clusters, and changes across checkpoints when there are several files.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from attnpipe.analyze.metrics import LOCAL_LABEL_THRESHOLD, LOCAL_WINDOW

TOP_HEADS = 5  # heads listed per section


def markdown_table(table: pd.DataFrame, floatfmt: str = ".3f") -> str:
    """A pipe table; floats formatted with `floatfmt`, other values with str()."""
    def cell(value) -> str:
        return format(value, floatfmt) if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + " --- |" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines)


def _head_list(aggregate: pd.DataFrame, metric: str, ascending: bool, top: int = TOP_HEADS) -> str:
    rows = aggregate[aggregate["metric"] == metric].sort_values("mean", ascending=ascending).head(top)
    if rows.empty:
        return f"_(metric {metric} not computed)_\n"
    lines = ["| head | mean | 95% CI | texts |", "| --- | --- | --- | --- |"]
    lines += [f"| L{r.layer}.H{r.head} | {r.mean:.3f} | {r.ci_low:.3f}–{r.ci_high:.3f} | {r.n_texts} |"
              for r in rows.itertuples()]
    return "\n".join(lines) + "\n"


def markdown_report(
    title: str,
    sources: Sequence[dict],
    summary: pd.DataFrame,
    aggregate: pd.DataFrame,
    clusters: pd.DataFrame | None = None,
    checkpoints: pd.DataFrame | None = None,
    figures: dict[str, str] | None = None,
) -> str:
    """sources: one dict per file (input, model, weights_sha256, num_texts); summary: layer_summary;
    aggregate: metrics.aggregate; clusters: clustering.cluster_table; checkpoints:
    compare.checkpoint_distances; figures: caption -> relative path."""
    out = [f"# {title}\n"]
    out.append("## Files\n")
    names = checkpoints.attrs.get("checkpoint_names") if checkpoints is not None else None
    names = names or [s.get("checkpoint") or Path(str(s["model"])).name for s in sources]
    out.append("| # | checkpoint | file | model | weights sha256 | texts |\n| --- | --- | --- | --- | --- | --- |")
    out += [f"| {i} | {name} | `{s['input']}` | {s['model']} | `{s['weights_sha256'][:12]}` | {s['num_texts']} |"
            for i, (s, name) in enumerate(zip(sources, names, strict=True))]
    out.append("\nMetric definitions: docs/METRICS.md. Heads are L{layer}.H{head} (model indices); means are "
               "over texts with a 95% bootstrap interval.\n")
    out.append("## Per layer (summary of the last file)\n")
    out.append(markdown_table(summary.reset_index()) + "\n")
    for caption, path in (figures or {}).items():
        out.append(f"![{caption}]({path})\n")
    out.append("## Most focused heads\n\nLowest normalised entropy (1 = uniform over the visible keys):\n")
    out.append(_head_list(aggregate, "normalized_entropy", ascending=True))
    out.append("Highest max attention (Voita et al. 2019 confidence):\n")
    out.append(_head_list(aggregate, "max_attention", ascending=False))
    out.append("## Positional heads\n")
    local = aggregate[(aggregate["metric"] == "local_share") & (aggregate["label"] == "local")]
    out.append(f"{len(local)} head(s) labelled local (mean share within {LOCAL_WINDOW} tokens ≥ "
               f"{LOCAL_LABEL_THRESHOLD}): "
               + (", ".join(f"L{r.layer}.H{r.head}" for r in local.itertuples()) or "none") + ".\n")
    out.append("Attend to the previous token:\n")
    out.append(_head_list(aggregate, "previous_token", ascending=False))
    out.append("Attend to the next token:\n")
    out.append(_head_list(aggregate, "next_token", ascending=False))
    out.append("## Special-token heads\n\nTo the first token ([CLS] / BOS):\n")
    out.append(_head_list(aggregate, "first_token", ascending=False))
    out.append("To [SEP] / EOS:\n")
    out.append(_head_list(aggregate, "sep_eos", ascending=False))
    out.append("To punctuation:\n")
    out.append(_head_list(aggregate, "punctuation", ascending=False))
    if clusters is not None:
        out.append("## Head clusters (Jensen–Shannon distance, average linkage)\n")
        k = clusters.attrs.get("num_clusters", clusters["cluster"].nunique())
        out.append(f"{k} clusters; unless --clusters is given, the count in 2-12 with the highest mean "
                   "silhouette (docs/METRICS.md).\n")
        for cluster, rows in clusters.groupby("cluster"):
            heads = ", ".join(f"L{r.layer}.H{r.head}" for r in rows.itertuples())
            out.append(f"- cluster {cluster} ({len(rows)} head(s)): {heads}")
        out.append("")
    if checkpoints is not None and not checkpoints.empty:
        out.append("## Changes across checkpoints\n\nHeads that moved most from the previous checkpoint "
                   "(JS distance, mean over texts):\n")
        top = checkpoints.sort_values("js_to_previous", ascending=False).head(TOP_HEADS)
        top = top.assign(head=[f"L{r.layer}.H{r.head}" for r in top.itertuples()])
        out.append(markdown_table(top[["checkpoint_name", "head", "js_to_previous", "js_to_first"]]
                                  .rename(columns={"checkpoint_name": "checkpoint"})) + "\n")
        per_layer = (checkpoints.groupby(["checkpoint", "checkpoint_name", "layer"])["js_to_previous"].mean()
                     .unstack("layer").reset_index("checkpoint", drop=True))
        per_layer.index.name = "checkpoint"
        out.append("Mean over heads per layer (rows: checkpoint):\n")
        per_layer.columns = [f"layer {layer}" for layer in per_layer.columns]
        out.append(markdown_table(per_layer.reset_index()) + "\n")
    return "\n".join(out)
