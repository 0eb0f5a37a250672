"""Diagnostics where a score fights the data: the report names validation AUROCs below 0.5 and shows the
reversed score's AUROC beside them, without changing what selection ranks.

Real trials (``run_trial`` on the session's small trained CNNs, no Ray): ``diff`` (log q(f(x̃)) − log q(f(x)))
ranks the blended digits as more in-distribution than the digits at ε = 0.01, the density itself does not.
"""

from __future__ import annotations

import numpy as np
import pytest

from densitune.results.store import to_table
from densitune.search.evaluate import Workspace
from densitune.search.models import discover
from densitune.search.ood.metrics import auroc
from densitune.search.report.diagnostics import below_chance
from densitune.search.report.tables import best_config, report, search_frame
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial


@pytest.fixture(scope="module")
def table(trained_models):
    group = next(g for g in discover(trained_models) if g.D == 8)
    spec = SearchSpec(experiment="d", val_ood="digits-blend", test_ood=("noise-uniform",), scores=("density", "diff"),
                      eps_grid=(0.0, 0.01), eval_limit=120)
    ws, rows = Workspace(), []
    for tid, params in (("plain", TrialParams(group.key, "density", "gmm_sum", eps=0.0)),
                        ("diff", TrialParams(group.key, "diff", "gmm_sum", eps=0.01))):
        rows += run_trial(ws, spec, group, params, tid)[1]
    return to_table(rows)


def test_below_chance_scores_are_named_with_the_reversed_auroc(table) -> None:
    df = search_frame(table)
    val = df[df["split"] == "val"]
    diff_auroc = float(val[val["score"] == "diff"]["auroc"].mean())
    assert diff_auroc < 0.5 < float(val[val["score"] == "density"]["auroc"].mean())  # the case this test is about
    bad = below_chance(df)
    assert bad[["score", "eps", "ood_dataset", "trials"]].values.tolist() == [["diff", 0.01, "digits-blend", 1]]
    assert bad["auroc"].iloc[0] == pytest.approx(diff_auroc, abs=1e-12)
    assert bad["auroc_reversed"].iloc[0] == pytest.approx(1 - diff_auroc, abs=1e-12)
    text = report(table, view="methods")
    assert "diagnostics: validation AUROC below 0.5" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("| diff |"))
    assert f"{diff_auroc:.4f}" in line and f"{1 - diff_auroc:.4f}" in line


def test_reversed_auroc_is_the_auroc_of_the_negated_score() -> None:
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.integers(0, 6, 50).astype(float), rng.integers(1, 7, 40).astype(float)  # with ties
    assert auroc(-s_id, -s_ood) == pytest.approx(1 - auroc(s_id, s_ood), abs=1e-12)


def test_selection_keeps_the_sign(table) -> None:
    best = best_config(table)
    assert best["score"] == "density"  # the below-chance score is not silently flipped into the winner
    only_diff = best_config(table.filter(np.array(table.column("score").to_pylist()) == "diff"))
    assert only_diff["score"] == "diff" and only_diff["val"] < 0.5  # ranked as recorded, not as 1 - AUROC


def test_no_diagnostics_when_every_score_is_above_chance(table) -> None:
    plain = table.filter(np.array(table.column("score").to_pylist()) == "density")
    assert below_chance(search_frame(plain)).empty
    assert "diagnostics" not in report(plain)
