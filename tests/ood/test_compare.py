"""Paired AUROC differences: coverage on synthetic scores with a known difference, DeLong vs bootstrap.

Synthetic model: for method A, ID scores ~ N(mu_A, 1) and OOD ~ N(0, 1), so AUROC_A = Phi(mu_A / sqrt 2); method B
scores the same samples with correlation rho to A and mean mu_B, so AUROC_B = Phi(mu_B / sqrt 2) and the true
difference is known exactly.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from densitune.errors import DensituneError
from densitune.search.ood.compare import auroc_rows, delong, paired_bootstrap
from densitune.search.ood.metrics import auroc

MU_A, MU_B, RHO = 1.0, 0.7, 0.6
TRUE_DIFF = norm.cdf(MU_A / np.sqrt(2)) - norm.cdf(MU_B / np.sqrt(2))


def _draw(rng: np.random.Generator, n: int, m: int, seeds: int | None = None):
    shape_i = (n,) if seeds is None else (seeds, n)
    shape_o = (m,) if seeds is None else (seeds, m)
    ei, eo = rng.normal(size=shape_i), rng.normal(size=shape_o)
    fi, fo = rng.normal(size=shape_i), rng.normal(size=shape_o)
    b_i = RHO * ei + np.sqrt(1 - RHO**2) * fi
    b_o = RHO * eo + np.sqrt(1 - RHO**2) * fo
    return ei + MU_A, eo, b_i + MU_B, b_o


def test_auroc_rows_equals_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    s_id = rng.integers(0, 5, size=(3, 40)).astype(float)  # many ties
    s_ood = rng.integers(0, 4, size=(3, 30)).astype(float)
    got = auroc_rows(s_id, s_ood)
    for r in range(3):
        labels = np.r_[np.ones(40), np.zeros(30)]
        assert got[r] == pytest.approx(roc_auc_score(labels, np.r_[s_id[r], s_ood[r]]), abs=1e-12)
        assert got[r] == pytest.approx(auroc(s_id[r], s_ood[r]), abs=1e-12)


def test_bootstrap_and_delong_cover_the_true_difference() -> None:
    """200 independent data sets: about 95 % of the intervals contain the true difference (binomial sd 1.5 %)."""
    rng = np.random.default_rng(1)
    hits = {"bootstrap": 0, "delong": 0}
    draws = 200
    for k in range(draws):
        a_i, a_o, b_i, b_o = _draw(rng, 150, 150)
        for res in (paired_bootstrap(a_i, a_o, b_i, b_o, n_boot=400, seed=k), delong(a_i, a_o, b_i, b_o)):
            hits[res.method] += res.low <= TRUE_DIFF <= res.high
    for method, h in hits.items():
        assert 0.90 <= h / draws <= 0.99, (method, h / draws)


def test_bootstrap_interval_agrees_with_delong_on_one_seed() -> None:
    rng = np.random.default_rng(2)
    a_i, a_o, b_i, b_o = _draw(rng, 1000, 800)
    boot = paired_bootstrap(a_i, a_o, b_i, b_o, n_boot=4000, seed=0)
    dl = delong(a_i, a_o, b_i, b_o)
    assert boot.diff == pytest.approx(dl.diff, abs=1e-12)
    assert boot.auroc_a == pytest.approx(auroc(a_i, a_o), abs=1e-12)
    width = dl.high - dl.low
    assert abs(boot.low - dl.low) < 0.1 * width and abs(boot.high - dl.high) < 0.1 * width
    assert (boot.high - boot.low) == pytest.approx(width, rel=0.1)
    assert not dl.contains_zero and dl.p_value is not None and dl.p_value < 0.05


def test_equal_methods_interval_contains_zero_and_pairing_matters() -> None:
    rng = np.random.default_rng(3)
    a_i, a_o, _, _ = _draw(rng, 300, 300)
    same = delong(a_i, a_o, a_i + 1e-3 * rng.normal(size=300), a_o + 1e-3 * rng.normal(size=300))
    assert same.contains_zero and same.p_value is not None and same.p_value > 0.05
    # strongly correlated scores: the paired interval is much narrower than two independent AUROC intervals
    b_i, b_o = a_i + 0.1 * rng.normal(size=300) - 0.1, a_o + 0.1 * rng.normal(size=300)
    paired = paired_bootstrap(a_i, a_o, b_i, b_o, n_boot=1000)
    single = paired_bootstrap(a_i, a_o, np.zeros(300), np.zeros(300), n_boot=1000)  # width of AUROC_A alone
    assert (paired.high - paired.low) < 0.5 * (single.high - single.low)


def test_several_seeds() -> None:
    rng = np.random.default_rng(4)
    a_i, a_o, b_i, b_o = _draw(rng, 200, 200, seeds=3)
    res = paired_bootstrap(a_i, a_o, b_i, b_o, n_boot=500)
    per_seed = [auroc(a_i[s], a_o[s]) - auroc(b_i[s], b_o[s]) for s in range(3)]
    assert res.n_seeds == 3 and res.diff == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert res.low < res.diff < res.high
    with pytest.raises(DensituneError, match="one seed"):
        delong(a_i, a_o, b_i, b_o)
    with pytest.raises(DensituneError, match="same samples"):
        paired_bootstrap(a_i, a_o, b_i[:, :10], b_o)
