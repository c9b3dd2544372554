"""Faithfulness check: do a method's token scores pick the tokens the target depends on?

Input: an attention file extracted with `--explain` (attention, ∂target/∂A and gradient × input
per text) and the same model. For every text and method (attnpipe.analyze.relevance.token_scores: raw,
rollout, flow, gradweight, chefer; plus grad_input itself and a random baseline):

Deletion protocol (DeYoung et al. 2020's comprehensiveness / Samek et al. 2017's AOPC, "most
relevant first"):
  * candidates are the text's non-special tokens (m of them); [CLS]/[SEP]/<s> are never deleted;
  * tokens are ranked by the method's score at the query row ([CLS] for encoders, the last token
    for causal LMs), highest first, ties broken by position;
  * for each fraction f in FRACTIONS the top round(f·m) tokens are *replaced by the tokenizer's
    mask token* (same length, positions unchanged); a tokenizer without one (GPT-2) has them
    *removed* instead;
  * the model (our forward pass) is re-run and the drop `target(x) − target(x with deletions)`
    recorded, for the class / token chosen on the full text (the stored gradient_target_label).
The perturbation curve is the mean drop per fraction over the texts; AOPC is the mean of the
curve over FRACTIONS (higher = the method found tokens the target depends on).

Agreement with plain input gradients: per text, Spearman's ρ between the method's scores and
|gradient × input| over the candidate tokens, then the mean over texts (texts where either is
constant are skipped and counted).

The random baseline ranks tokens by a seeded random permutation; its curve is averaged over
RANDOM_REPEATS permutations per text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from attnpipe.errors import AttnpipeError
from attnpipe.analyze.relevance import METHODS, default_query_row, token_scores

FRACTIONS: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5)
RANDOM_REPEATS = 10
REFERENCE = "grad_input"


def deletion_order(scores: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Candidate positions sorted by score, highest first (ties: earlier position first)."""
    candidates = np.asarray(candidates)
    order = np.lexsort((candidates, -np.asarray(scores, dtype=np.float64)[candidates]))
    return candidates[order]


def counts(m: int, fractions=FRACTIONS) -> list[int]:
    return [int(round(f * m)) for f in fractions]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's ρ (average ranks for ties); NaN when either input is constant."""
    ra = pd.Series(np.asarray(a, dtype=np.float64)).rank().to_numpy()
    rb = pd.Series(np.asarray(b, dtype=np.float64)).rank().to_numpy()
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def aopc(curve: np.ndarray) -> float:
    """Area over the perturbation curve: the mean drop over the deletion steps."""
    return float(np.mean(curve))


@dataclass(frozen=True)
class Deleter:
    """Re-runs the model on a text with some tokens deleted; returns target values."""

    model: object  # attnpipe.extract.loading.LoadedModel
    objective: object  # attnpipe.extract.gradients.Objective
    mask_id: int | None

    def values(self, token_ids: np.ndarray, deletions: list[np.ndarray], label: int) -> np.ndarray:
        from attnpipe.extract.gradients import run

        device = self.model.device
        if self.mask_id is not None:  # replace: every variant has the text's length, one batch
            batch = np.repeat(np.asarray(token_ids)[None], len(deletions), axis=0)
            for row, positions in enumerate(deletions):
                batch[row, positions] = self.mask_id
            with torch.no_grad():
                out = run(self.model, torch.as_tensor(batch, device=device))
                return self.objective.value(out.hidden, label).double().cpu().numpy()
        values = []
        for positions in deletions:  # remove: lengths differ, one text at a time
            kept = np.delete(np.asarray(token_ids), positions)
            with torch.no_grad():
                out = run(self.model, torch.as_tensor(kept[None], device=device))
                values.append(float(self.objective.value(out.hidden, label)[0]))
        return np.asarray(values)


def text_curves(item, layers, model_type: str, deleter: Deleter, methods=METHODS, seed: int = 0,
                fractions=FRACTIONS) -> tuple[pd.DataFrame, dict[str, float]]:
    """One text: (long table method, fraction, drop), and each method's Spearman ρ with grad_input."""
    n = item.num_tokens
    row = default_query_row(model_type, n)
    scores = token_scores(item, layers, row, methods)
    candidates = np.flatnonzero(~np.asarray(item.special_tokens_mask, dtype=bool))
    if len(candidates) == 0:
        return pd.DataFrame(columns=["text_id", "method", "fraction", "drop"]), {}
    ks = counts(len(candidates), fractions)
    orders = {name: deletion_order(values, candidates) for name, values in scores.items()}
    rng = np.random.default_rng([seed, int(np.sum(item.token_ids) % (2**31)), n])
    randoms = [rng.permutation(candidates) for _ in range(RANDOM_REPEATS)]
    names = list(orders) + [f"random/{i}" for i in range(RANDOM_REPEATS)]
    deletions = [order[:k] for order in list(orders.values()) + randoms for k in ks]
    full = deleter.values(item.token_ids, [np.zeros(0, dtype=np.int64)], item.gradient_target_label)[0]
    drops = full - deleter.values(item.token_ids, deletions, item.gradient_target_label)
    drops = drops.reshape(len(names), len(ks))
    rows = [
        {"text_id": item.id, "method": name, "fraction": f, "drop": drops[i, j]}
        for i, name in enumerate(names[: len(orders)]) for j, f in enumerate(fractions)
    ] + [
        {"text_id": item.id, "method": "random", "fraction": f, "drop": drops[len(orders):, j].mean()}
        for j, f in enumerate(fractions)
    ]
    reference = scores[REFERENCE][candidates]
    rhos = {name: spearman(values[candidates], reference) for name, values in scores.items()}
    rhos["random"] = float(np.nanmean([spearman(rng.random(len(candidates)), reference)
                                       for _ in range(RANDOM_REPEATS)]))
    return pd.DataFrame(rows), rhos


def corpus_faithfulness(attention_file, model, objective, methods=METHODS, max_texts: int | None = None,
                        seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary: one row per method with aopc, spearman_grad_input, texts; curves: method,
    fraction, mean drop) over the first `max_texts` texts of an open AttentionFile."""
    meta = attention_file.meta
    if meta.gradient_target is None:
        raise AttnpipeError(f"{attention_file.path} holds no gradients: extract it with --explain")
    if tuple(meta.heads) != tuple(range(meta.num_heads)):
        raise AttnpipeError("the faithfulness check needs every head stored: extract with --heads all")
    mask_id = getattr(model.tokenizer, "mask_token_id", None)
    deleter = Deleter(model, objective, mask_id)
    count = len(attention_file) if max_texts is None else min(max_texts, len(attention_file))
    curves, rho_rows = [], []
    for index in range(count):
        item = attention_file[index]
        table, rhos = text_curves(item, meta.layers, meta.model_type, deleter, methods, seed)
        curves.append(table)
        rho_rows += [{"text_id": item.id, "method": k, "spearman": v} for k, v in rhos.items()]
    per_text = pd.concat(curves, ignore_index=True)
    curve = per_text.groupby(["method", "fraction"], sort=False)["drop"].mean().reset_index()
    rhos = pd.DataFrame(rho_rows)
    summary = []
    for method in curve["method"].unique():
        values = curve.loc[curve["method"] == method, "drop"].to_numpy()
        rho = rhos.loc[rhos["method"] == method, "spearman"]
        summary.append({
            "method": method,
            "aopc": aopc(values),
            "spearman_grad_input": float(rho.mean()) if rho.notna().any() else float("nan"),
            "spearman_texts": int(rho.notna().sum()),
            "texts": count,
        })
    summary = pd.DataFrame(summary)
    summary.attrs["protocol"] = "mask" if mask_id is not None else "remove"
    return summary, curve


def markdown_table(summary: pd.DataFrame) -> str:
    lines = ["| method | AOPC (mean drop of the target) | Spearman ρ with \\|grad × input\\| |",
             "| --- | --- | --- |"]
    for row in summary.itertuples():
        lines.append(f"| {row.method} | {row.aopc:.3f} | {row.spearman_grad_input:.3f} |")
    return "\n".join(lines)
