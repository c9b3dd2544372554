#!/usr/bin/env python3
"""Prune a classifier's heads by attribution, by gate gradient and at random; tabulate the damage.

Hao et al. 2021's head-pruning comparison at our scale (attnpipe/analyze/pruning.py): the file
gives the head scores (extracted with --explain predicted --attribution ig, every layer and head),
the model is re-run with the k most (or least) important heads' gates at 0 on labelled texts.

Example:
    python scripts/make_classifier.py --out-dir results/classifier
    python extract_attention.py --model_dir results/classifier --texts-file data/labels/sentiment.jsonl \\
        --explain predicted --attribution ig --output_file results/sentiment_ig.h5
    python scripts/prune_heads.py results/sentiment_ig.h5 --labels data/labels/sentiment.jsonl \\
        --output-dir results/pruning
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root: attnpipe
from attnpipe.errors import AttnpipeError, run_cli  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="attention file made with --explain predicted --attribution ig")
    ap.add_argument("--labels", type=Path, required=True,
                    help=".jsonl of the texts to evaluate: 'text' and 'label' (a class name of the model's id2label)")
    ap.add_argument("--output-dir", type=Path, required=True, help="folder for pruning.csv/.parquet and pruning.md")
    ap.add_argument("--model_dir", "--model-dir", type=Path, default=None,
                    help="the classifier (default: the folder recorded in the file)")
    ap.add_argument("--counts", default="0,6,12,18,24,36", help="numbers of heads to prune (default: 0,6,12,18,24,36)")
    ap.add_argument("--random-orders", type=int, default=10, help="random orders averaged (default: 10)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random orders (default: 0)")
    args = ap.parse_args(argv)

    import torch

    from attnpipe.analyze import pruning, tables
    from attnpipe.extract.gradients import build_objective, parse_target
    from attnpipe.extract.loading import load_model
    from attnpipe.store import open_attention

    counts = [int(c) for c in args.counts.split(",") if c.strip()]
    if args.random_orders < 1 or any(c < 0 for c in counts):
        raise AttnpipeError("--random-orders must be at least 1 and --counts 0 or more")
    with open_attention(args.input) as f:
        scores = pruning.head_scores(f)
        model_dir = args.model_dir or Path(f.meta.model)
    model = load_model(model_dir, torch.device("cpu"))
    label2id = {str(k): int(v) for k, v in (model.hf_model.config.label2id or {}).items()}
    rows = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    unknown = sorted({str(r.get("label")) for r in rows} - set(label2id))
    if unknown:
        raise AttnpipeError(f"{args.labels}: labels {unknown} are not the model's ({', '.join(label2id)})")
    data = pruning.Labelled(tuple(r["text"] for r in rows), tuple(label2id[str(r["label"])] for r in rows))
    objective = build_objective(model, parse_target("predicted"))
    curves = pruning.prune_curves(model, objective, data, scores, counts, args.random_orders, args.seed)
    folder = tables.prepare_output_dir(args.output_dir)
    written = tables.write_table(curves, folder, "pruning")
    text = "".join(f"Pruning the {d} important heads first (accuracy / mean logit drop):\n\n"
                   f"{pruning.markdown_table(curves, d)}\n\n" for d in ("most", "least"))
    written.append(tables.write_atomic(folder / "pruning.md", lambda tmp: tmp.write_text(text, encoding="utf-8")))
    print(text)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
