"""Diagnostics where a score fights the data: validation AUROC below 0.5.

An AUROC below 0.5 means the score ranks OOD inputs as *more* in-distribution than ID inputs (``diff`` on
the digits does). The report says so and shows the reversed score's AUROC beside it, 1 − AUROC (exact:
reversing every score swaps each ordered pair, and ties count 1/2 either way). The sign used for
selection is never flipped: a reversed score would be a new method, chosen after looking at the data.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["BELOW", "below_chance"]

#: AUROC of a score that carries no information (random ranking)
BELOW = 0.5


def below_chance(df: pd.DataFrame) -> pd.DataFrame:
    """Per (score, density, parameters, ε, validation OOD set): the mean validation AUROC over the trials and
    seeds whose mean is below 0.5, and the reversed score's AUROC (1 − AUROC). Empty when there are none.

    ``df``: search rows (:func:`densitune.search.report.tables.search_frame`).
    """
    val = df[(df["split"] == "val") & df["auroc"].notna()]
    keys = ["score", "density", "density_params", "eps", "ood_dataset"]
    if val.empty:
        return pd.DataFrame(columns=[*keys, "trials", "auroc", "auroc_reversed"])
    per = (val.groupby([*keys, "experiment", "trial_id"], dropna=False)["auroc"].mean().reset_index())
    bad = per[per["auroc"] < BELOW]
    out = (bad.groupby(keys, dropna=False).agg(trials=("trial_id", "nunique"), auroc=("auroc", "mean")).reset_index())
    out["auroc_reversed"] = 1.0 - out["auroc"]
    return out.sort_values(["auroc", "score", "eps"], kind="mergesort").reset_index(drop=True)
