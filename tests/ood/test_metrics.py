"""Tests for search/ood/metrics.py: analytic values, sklearn agreement on raw scores, brute-force FPR@95."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from densitune.errors import ConfigError, DensituneError
from densitune.search.ood.metrics import auprc, auroc, fpr_at_tpr, ood_metrics


def _brute_force_fpr(score_id: np.ndarray, score_ood: np.ndarray, tpr: float = 0.95) -> float:
    """Try every candidate threshold; keep the largest one that accepts >= tpr of ID; report OOD acceptance."""
    candidates = np.concatenate([score_id, score_ood, [np.inf, -np.inf]])
    ok = [t for t in candidates if np.mean(score_id >= t) >= tpr - 1e-12]
    t = max(ok)
    return float(np.mean(score_ood >= t))


def test_separable_scores() -> None:
    s_id = np.array([5.0, 6.0, 7.0, 8.0])
    s_ood = np.array([-1.0, 0.0, 1.0])
    assert ood_metrics(s_id, s_ood) == {"auroc": 1.0, "auprc": 1.0, "fpr95": 0.0}


def test_reversed_scores() -> None:
    s_id = np.array([-1.0, 0.0, 1.0])
    s_ood = np.array([5.0, 6.0, 7.0, 8.0])
    assert auroc(s_id, s_ood) == 0.0
    assert fpr_at_tpr(s_id, s_ood) == 1.0


def test_identical_distributions_are_chance() -> None:
    rng = np.random.default_rng(0)
    s_id, s_ood = rng.normal(size=20_000), rng.normal(size=20_000)
    m = ood_metrics(s_id, s_ood)
    assert abs(m["auroc"] - 0.5) < 0.02
    assert abs(m["auprc"] - 0.5) < 0.02  # chance level = N_id / (N_id + N_ood)
    assert abs(m["fpr95"] - 0.95) < 0.02


def test_all_ties_give_half() -> None:
    assert auroc(np.zeros(10), np.zeros(7)) == 0.5
    assert fpr_at_tpr(np.zeros(10), np.zeros(7)) == 1.0


def test_agrees_with_sklearn_on_raw_scores_with_ties() -> None:
    rng = np.random.default_rng(1)
    s_id = np.round(rng.normal(1.0, 1.0, size=300), 1)  # rounding creates ties within and across sets
    s_ood = np.round(rng.normal(0.0, 1.0, size=200), 1)
    labels = np.r_[np.ones(300), np.zeros(200)]
    scores = np.r_[s_id, s_ood]
    assert auroc(s_id, s_ood) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auprc(s_id, s_ood) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tpr", [0.95, 0.9, 0.5, 1.0])
def test_fpr_matches_brute_force(seed: int, tpr: float) -> None:
    rng = np.random.default_rng(seed)
    n_id = int(rng.integers(5, 41))
    s_id = rng.integers(0, 15, size=n_id).astype(float)  # small integer scores: many ties
    s_ood = rng.integers(-5, 10, size=int(rng.integers(3, 30))).astype(float)
    assert fpr_at_tpr(s_id, s_ood, tpr) == _brute_force_fpr(s_id, s_ood, tpr)


def test_fpr_small_example_by_hand() -> None:
    # 20 ID scores 1..20: accepting >= 95% (19 of 20) needs threshold 2; OOD scores >= 2: {2, 5, 30} of 5
    s_id = np.arange(1, 21, dtype=float)
    s_ood = np.array([0.0, 1.5, 2.0, 5.0, 30.0])
    assert fpr_at_tpr(s_id, s_ood) == pytest.approx(3 / 5)
    assert fpr_at_tpr(s_id, s_ood) == _brute_force_fpr(s_id, s_ood)


def test_accepts_tensors_and_lists() -> None:
    s_id = torch.tensor([3.0, 4.0, 2.5], requires_grad=True)
    s_ood = torch.tensor([1.0, 2.6], dtype=torch.float64)
    expected = ood_metrics(np.array([3.0, 4.0, 2.5]), np.array([1.0, 2.6]))
    assert ood_metrics(s_id, s_ood) == expected
    assert ood_metrics([3.0, 4.0, 2.5], [1.0, 2.6]) == expected
    assert expected["auroc"] == pytest.approx(5 / 6)


def test_infinite_scores_are_ranked() -> None:
    # a Gaussian density can underflow to -inf far from the data: that is the most OOD score possible
    s_id = np.array([-3.0, -2.0, -1.0])
    s_ood = np.array([-np.inf, -np.inf, -10.0])
    assert ood_metrics(s_id, s_ood) == {"auroc": 1.0, "auprc": 1.0, "fpr95": 0.0}
    assert auroc(np.array([np.inf, 0.0]), np.array([1.0])) == 0.5


@pytest.mark.parametrize("fn", [auroc, auprc, fpr_at_tpr, ood_metrics])
def test_nan_raises(fn) -> None:
    with pytest.raises(DensituneError, match="NaN"):
        fn(np.array([1.0, np.nan]), np.array([0.0]))
    with pytest.raises(DensituneError, match="NaN"):
        fn(torch.tensor([1.0]), torch.tensor([0.0, float("nan")]))


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), np.array([])])
def test_bad_shapes_raise(bad: np.ndarray) -> None:
    with pytest.raises(DensituneError):
        auroc(bad, np.array([0.0]))


@pytest.mark.parametrize("tpr", [0.0, -0.1, 1.5])
def test_bad_tpr_is_config_error(tpr: float) -> None:
    with pytest.raises(ConfigError):
        fpr_at_tpr(np.array([1.0]), np.array([0.0]), tpr)


def _finite_stand_ins(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same order with +/-inf replaced by finite values beyond every finite score (sklearn refuses inf)."""
    pooled = np.r_[s_id, s_ood]
    finite = pooled[np.isfinite(pooled)]
    lo, hi = (finite.min() - 1, finite.max() + 1) if finite.size else (-1.0, 1.0)
    pooled = np.where(pooled == np.inf, hi, np.where(pooled == -np.inf, lo, pooled))
    return pooled[: s_id.size], pooled[s_id.size:]


def _sklearn(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[float, float]:
    a, b = _finite_stand_ins(s_id, s_ood)
    labels, scores = np.r_[np.ones(a.size), np.zeros(b.size)], np.r_[a, b]
    return roc_auc_score(labels, scores), average_precision_score(labels, scores)


def _cases() -> list[tuple[str, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(7)
    cases = []
    for i in range(20):  # continuous scores, sizes from tiny to a few thousand, unequal set sizes
        n_id, n_ood = int(rng.integers(1, 3000)), int(rng.integers(1, 3000))
        cases.append((f"random-{i}", rng.normal(0.5, 1, n_id), rng.normal(0, 1.5, n_ood)))
    for i in range(10):  # heavy ties: a handful of distinct values, within and across the two sets
        cases.append((f"ties-{i}", rng.integers(0, 4, int(rng.integers(1, 500))).astype(float),
                      rng.integers(-1, 3, int(rng.integers(1, 500))).astype(float)))
    inf = np.inf
    cases += [
        ("inf-mixed", np.r_[rng.normal(size=200), [inf, inf, -inf]], np.r_[rng.normal(-1, 1, 300), [-inf] * 20, [inf]]),
        ("inf-only", np.array([inf, -inf, inf]), np.array([-inf, -inf, inf])),
        ("all-tied", np.full(50, -3.0), np.full(80, -3.0)),
        ("one-each", np.array([1.0]), np.array([1.0])),
        ("float32-ties", rng.normal(size=4000).astype(np.float32).round(2).astype(float),
         rng.normal(0.3, 1, size=3000).astype(np.float32).round(2).astype(float)),
    ]
    return cases


@pytest.mark.parametrize(("name", "s_id", "s_ood"), _cases(), ids=[c[0] for c in _cases()])
def test_numpy_metrics_equal_sklearn(name: str, s_id: np.ndarray, s_ood: np.ndarray) -> None:
    """The numpy AUROC / AP are scikit-learn's roc_auc_score / average_precision_score, to float rounding."""
    ref_auroc, ref_ap = _sklearn(s_id, s_ood)
    m = ood_metrics(s_id, s_ood)
    assert m["auroc"] == pytest.approx(ref_auroc, abs=1e-12)
    assert m["auprc"] == pytest.approx(ref_ap, abs=1e-12)
    assert auroc(s_id, s_ood) == m["auroc"] and auprc(s_id, s_ood) == m["auprc"]
    # the pairwise definition, independent of any sorting: P(ID > OOD) + 0.5 P(tie)
    if s_id.size * s_ood.size <= 2_000_000:
        gt = (s_id[:, None] > s_ood[None, :]).mean() + 0.5 * (s_id[:, None] == s_ood[None, :]).mean()
        assert m["auroc"] == pytest.approx(gt, abs=1e-12)


def test_auroc_is_exact_on_integer_counts() -> None:
    """2 of 3 ID above both OOD, 1 tied with one OOD: U = 2*2 + (1 + 0.5) = 5.5 of 6 pairs, exactly."""
    s_id, s_ood = np.array([3.0, 2.0, 1.0]), np.array([1.0, 0.0])
    assert auroc(s_id, s_ood) == 5.5 / 6
    # AP by hand: thresholds 3, 2, 1, 0: precision 1, 1, 3/4 (3 ID + 1 OOD at >= 1), recall steps 1/3 each
    assert auprc(s_id, s_ood) == pytest.approx((1 + 1 + 0.75) / 3, abs=1e-15)


@pytest.mark.process
def test_metrics_import_neither_sklearn_nor_scipy() -> None:
    """A search trial computes its metrics without loading scikit-learn or scipy (about 1 s per trial process)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from densitune.search.ood.metrics import ood_metrics; "
            "ood_metrics(np.r_[1.0, 2.0, -np.inf], np.r_[0.5, 2.0]); "
            "print(sorted(m for m in ('sklearn', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
