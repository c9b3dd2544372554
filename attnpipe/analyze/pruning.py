"""Head pruning by importance (Hao et al. 2021 §4.1 at our scale): rank every head of a classifier
by a score, zero the gates of the k highest (or lowest) ranked heads, re-run the model, and record
accuracy and the drop of the logit the full model predicts. Scores compared:

    attribution   the paper's I_h = mean over texts of max_{q,k} Attr_h(A) (--attribution ig)
    gate-gradient Michel et al. 2019's mean |∂ logit / ∂ gate_h| (head_importance of --explain)
    random        a seeded random order, averaged over `random_orders` orders

Pruning the heads a good score calls *most* important should hurt the most; pruning those it calls
*least* important should hurt the least. The file gives the scores, the model is re-run (like the
faithfulness check, this loads the model). Texts run as one padded batch through our own pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from attnpipe.errors import AttnpipeError

SCORES = ("attribution", "gate-gradient", "random")


@dataclass(frozen=True)
class Labelled:
    texts: tuple[str, ...]
    labels: tuple[int, ...]  # class index per text, or -1 without a gold label


def head_scores(f) -> dict[str, np.ndarray]:
    """(num_layers, num_heads) importance per score from an attention file of every layer and head."""
    meta = f.meta
    if meta.attribution is None:
        raise AttnpipeError(f"{f.path} holds no attention attribution: extract it with --explain predicted "
                            "--attribution ig")
    if len(meta.layers) != meta.num_layers or len(meta.heads) != meta.num_heads:
        raise AttnpipeError(f"{f.path} stores layers {list(meta.layers)} and heads {list(meta.heads)}: pruning ranks "
                            "every head, extract with --layer all --heads all")
    attribution = np.mean([item.attention_attribution.reshape(meta.num_layers, meta.num_heads, -1).max(-1)
                           for item in f], axis=0)
    gate = np.mean([item.head_importance for item in f], axis=0)
    return {"attribution": attribution, "gate-gradient": gate}


def _logits(model, objective, batch, gates: torch.Tensor, classes: int) -> torch.Tensor:
    out = model.family.forward(model.weights, batch, head_gates={"self": gates})
    hidden = objective.states(out)
    return torch.stack([objective.value(hidden, c) for c in range(classes)], dim=-1)  # (B, C)


def prune_curves(model, objective, data: Labelled, scores: dict[str, np.ndarray], counts: Sequence[int],
                 random_orders: int = 10, seed: int = 0) -> pd.DataFrame:
    """One row per (score, order, k): accuracy and mean logit drop with k heads pruned."""
    encoded = model.tokenizer(list(data.texts), padding=True, return_tensors="pt")
    batch = {"input_ids": encoded["input_ids"].to(model.device),
             "attention_mask": encoded["attention_mask"].to(model.device)}
    num_layers, num_heads = next(iter(scores.values())).shape
    labels = np.asarray(data.labels)
    with torch.no_grad():
        ones = torch.ones(num_layers, num_heads, device=model.device)
        classes = int(model.hf_model.config.num_labels)
        full = _logits(model, objective, batch, ones, classes).double().cpu().numpy()
        predicted = full.argmax(-1)
        rows = []
        rng = np.random.default_rng(seed)
        orders = {name: [np.argsort(-values.ravel(), kind="stable")] for name, values in scores.items()}
        orders["random"] = [rng.permutation(num_layers * num_heads) for _ in range(random_orders)]
        for name, ranked in orders.items():
            for direction in ("most", "least"):
                for k in counts:
                    accuracy, drop = [], []
                    for order in ranked:
                        chosen = order[:k] if direction == "most" else order[::-1][:k]
                        gates = ones.clone().view(-1)
                        gates[torch.as_tensor(np.array(chosen), dtype=torch.long)] = 0.0
                        logits = _logits(model, objective, batch, gates.view(num_layers, num_heads),
                                         classes).double().cpu().numpy()
                        gold = np.where(labels >= 0, labels, predicted)
                        accuracy.append(float((logits.argmax(-1) == gold).mean()))
                        drop.append(float((full[np.arange(len(full)), predicted]
                                           - logits[np.arange(len(full)), predicted]).mean()))
                    rows.append((name, direction, k, float(np.mean(accuracy)), float(np.mean(drop)), len(ranked)))
    return pd.DataFrame(rows, columns=["score", "pruned", "heads_pruned", "accuracy", "logit_drop", "orders"])


def markdown_table(curves: pd.DataFrame, direction: str) -> str:
    """accuracy / logit drop per score (rows) and number of pruned heads (columns)."""
    part = curves[curves["pruned"] == direction]
    counts = sorted(part["heads_pruned"].unique())
    lines = ["| score | " + " | ".join(f"{k} heads" for k in counts) + " |",
             "| --- | " + " | ".join("---:" for _ in counts) + " |"]
    for name in SCORES:
        rows = part[part["score"] == name].set_index("heads_pruned")
        if rows.empty:
            continue
        cells = [f"{rows.loc[k, 'accuracy']:.2f} / {rows.loc[k, 'logit_drop']:.2f}" for k in counts]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
