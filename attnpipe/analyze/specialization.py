"""Head specialisation across texts: what each head attends to, and how reliably (seed 002).

A head's *role profile* is its mean weight on each kind of key (the role metrics below, from
`metrics.py`). Its *dominant role* is the role with the largest mean over texts, and its
*consistency* is the share of texts in which that same role is the largest: 1.0 means the head
does the same thing on every text, 1/len(ROLES) is what an unspecialised head gets by chance.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from attnpipe.errors import AttnpipeError

# Metrics that each measure the attention weight one kind of key receives (all in 0..1).
ROLES = ("self", "previous_token", "next_token", "first_token", "sep_eos", "punctuation")
# A head whose largest role takes less than this share of its weight is labelled "broad".
BROAD_THRESHOLD = 0.3


def specialization(long: pd.DataFrame) -> pd.DataFrame:
    """One row per (layer, head): mean weight per role, dominant role, consistency, label.

    `long` is the long metrics table (text_id, layer, head, metric, value) with the ROLES metrics.
    """
    rows = long[long["metric"].astype(str).isin(ROLES)]
    if rows.empty:
        raise AttnpipeError(f"no role metrics ({', '.join(ROLES)}) in the metrics table")
    per_text = rows.pivot_table(index=["layer", "head", "text_id"], columns="metric",
                                values="value", observed=True)  # NaN where a role is undefined
    roles = [role for role in ROLES if role in per_text.columns]
    per_text = per_text[roles]
    # The role that is largest on each text (a text where every role is NaN counts for none).
    defined = per_text.notna().any(axis=1)
    top_per_text = per_text[defined].fillna(-np.inf).idxmax(axis=1)
    means = per_text.groupby(level=["layer", "head"]).mean()
    out = means.add_prefix("mean_")
    out["dominant_role"] = means.fillna(-np.inf).idxmax(axis=1)
    out["dominant_weight"] = means.max(axis=1)
    dominant = out["dominant_role"].reindex(top_per_text.index.droplevel("text_id"))
    hits = pd.Series(top_per_text.to_numpy() == dominant.to_numpy(), index=top_per_text.index)
    out["consistency"] = hits.groupby(level=["layer", "head"]).mean()
    out["n_texts"] = defined.groupby(level=["layer", "head"]).sum()
    out["label"] = np.where(out["dominant_weight"] < BROAD_THRESHOLD, "broad", out["dominant_role"])
    return out.reset_index()
