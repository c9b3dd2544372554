"""Head specialisation on planted heads: dominant role and consistency across texts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from attnpipe.errors import AttnpipeError
from attnpipe.analyze.specialization import specialization


def long_rows(text_id: str, head: int, values: dict[str, float]) -> list[dict]:
    return [{"text_id": text_id, "layer": 3, "head": head, "metric": m, "value": v} for m, v in values.items()]


def test_planted_heads_get_their_role_and_consistency():
    rows = []
    for t in range(10):
        text = f"t{t}"
        # head 0: previous-token on every text
        rows += long_rows(text, 0, {"self": 0.1, "previous_token": 0.8, "next_token": 0.05, "first_token": 0.05})
        # head 1: first token on 7 texts, self on 3: dominant first_token, consistency 0.7
        first = t < 7
        rows += long_rows(text, 1, {"self": 0.2 if first else 0.6, "previous_token": 0.05,
                                    "next_token": np.nan, "first_token": 0.6 if first else 0.2})
        # head 2: spread thin everywhere: labelled broad
        rows += long_rows(text, 2, {"self": 0.1, "previous_token": 0.12, "next_token": 0.1, "first_token": 0.11})
    table = specialization(pd.DataFrame(rows)).set_index("head")
    assert table.loc[0, "dominant_role"] == "previous_token" and table.loc[0, "consistency"] == 1.0
    assert table.loc[1, "dominant_role"] == "first_token"
    assert table.loc[1, "consistency"] == pytest.approx(0.7)
    assert table.loc[1, "mean_first_token"] == pytest.approx(0.48)
    assert table.loc[2, "label"] == "broad" and table.loc[0, "label"] == "previous_token"
    assert (table["n_texts"] == 10).all() and (table["layer"] == 3).all()


def test_a_table_without_role_metrics_is_refused():
    rows = pd.DataFrame([{"text_id": "a", "layer": 0, "head": 0, "metric": "entropy", "value": 1.0}])
    with pytest.raises(AttnpipeError, match="no role metrics"):
        specialization(rows)
