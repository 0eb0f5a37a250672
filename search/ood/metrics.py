"""OOD detection metrics: in-distribution is the positive class, higher score = more in-distribution.

Conventions (the research note, DDU, OpenOOD): AUROC and AUPRC treat in-distribution samples as positives
(label 1) and OOD samples as negatives (label 0); "FPR at 95% TPR" is the fraction of OOD samples accepted
by the threshold that accepts 95% of the in-distribution samples (lower is better).

All three metrics depend only on the order of the scores, so they are computed in numpy from one sort of the
pooled scores (tied values form one group): the same definitions as ``sklearn.metrics.roc_auc_score`` and
``average_precision_score`` (tests/ood/test_metrics.py checks them against scikit-learn), without importing
scikit-learn or scipy into every search trial, and accepting +/-inf (a density can underflow to -inf far from
the data). NaN scores raise :class:`DensituneError`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

from densitune.checks import Interval, check_params
from densitune.errors import ConfigError, DensituneError

if TYPE_CHECKING:  # numpy and torch load when a metric is computed: the table below is light
    import numpy as np
    import torch

    ArrayLike: TypeAlias = np.ndarray | torch.Tensor | Sequence[float]

__all__ = ["METRICS", "Metric", "auprc", "auroc", "check_metric", "fpr_at_tpr", "ood_metrics"]


@dataclass(frozen=True)
class Metric:
    """One OOD metric: its result column, which way is better ("max" or "min") and its label in figures."""

    name: str
    direction: str
    label: str


#: The one table of metrics (columns of every search row, in this order): spec, report and plots read it.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("auroc", "max", "AUROC"),
        Metric("auprc", "max", "AUPRC"),
        Metric("fpr95", "min", "FPR@95%TPR (lower is better)"),
    )
}


def check_metric(name: str) -> Metric:
    """The metric called ``name``; :class:`ConfigError` naming the known ones otherwise."""
    if name not in METRICS:
        raise ConfigError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name]


def _as_scores(scores: ArrayLike, what: str) -> np.ndarray:
    """1-D float64 numpy copy of ``scores``; raises on NaN, emptiness or a wrong shape."""
    import numpy as np
    import torch

    if isinstance(scores, torch.Tensor):
        arr = scores.detach().to("cpu", torch.float64).numpy()
    else:
        arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 1:
        raise DensituneError(f"{what} scores must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        raise DensituneError(f"{what} scores are empty")
    if np.isnan(arr).any():
        raise DensituneError(f"{what} scores contain NaN")
    return arr


def _tie_groups(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per distinct score value, from the highest down: (ID count, OOD count), each (G,) float64.

    Equal scores (``-inf``, ``+inf`` included) form one group, as one threshold of a ROC curve does.
    """
    import numpy as np

    pooled = np.concatenate([s_id, s_ood])
    order = np.argsort(-pooled, kind="stable")
    ranked = pooled[order]
    is_id = (order < s_id.size).astype(np.float64)
    # group starts: the first element and every place where the value changes (== is exact for +/-inf, unlike diff)
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    pos = np.add.reduceat(is_id, starts)
    return pos, np.diff(np.r_[starts, pooled.size]).astype(np.float64) - pos


def _auroc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Mann-Whitney: P(ID > OOD) + 0.5 P(tie) from the tie groups (highest first); exact integer sums."""
    import numpy as np

    n_pos, n_neg = pos.sum(), neg.sum()
    below = n_neg - np.cumsum(neg)  # OOD samples strictly below each group
    return float(np.dot(pos, below + 0.5 * neg) / (n_pos * n_neg))


def _auprc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Average precision, sum over thresholds of (recall step) x precision, as scikit-learn's step integral."""
    import numpy as np

    tps, fps = np.cumsum(pos), np.cumsum(neg)
    return float(np.dot(pos / pos.sum(), tps / (tps + fps)))


def auroc(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Area under the ROC curve, in-distribution positive (``sklearn.metrics.roc_auc_score``).

    Args:
        score_id: (N_id,) scores of in-distribution samples (numpy array or tensor), higher = more ID.
        score_ood: (N_ood,) scores of OOD samples.

    Returns:
        P(score_id > score_ood) + 0.5 P(tie): 1.0 = perfect separation, 0.5 = chance, 0.0 = reversed.
    """
    return _auroc(*_tie_groups(_as_scores(score_id, "in-distribution"), _as_scores(score_ood, "OOD")))


def auprc(score_id: ArrayLike, score_ood: ArrayLike) -> float:
    """Area under the precision-recall curve with ID positive (``sklearn.metrics.average_precision_score``):
    sum over the distinct thresholds t, highest first, of (recall(t) - recall(previous t)) x precision(t).

    Its chance level is N_id / (N_id + N_ood), not 0.5.
    """
    return _auprc(*_tie_groups(_as_scores(score_id, "in-distribution"), _as_scores(score_ood, "OOD")))


def fpr_at_tpr(score_id: ArrayLike, score_ood: ArrayLike, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the strictest threshold that still accepts ``tpr`` of the ID samples.

    A sample is accepted as in-distribution when its score is >= the threshold t. t is the largest value with
    mean(score_id >= t) >= tpr, i.e. the k-th largest ID score with k = ceil(tpr * N_id); the result is
    mean(score_ood >= t). No interpolation between ROC points is done (OpenOOD interpolates on the ROC curve,
    which can differ by at most one OOD sample's worth of the OOD set near ties).

    Args:
        score_id: (N_id,) in-distribution scores, higher = more ID.
        score_ood: (N_ood,) OOD scores.
        tpr: target true-positive rate in (0, 1].

    Raises:
        ConfigError: ``tpr`` outside (0, 1].
    """
    import numpy as np

    check_params({"tpr": tpr}, {"tpr": [Interval(float, 0, 1, closed="right")]})
    s_id = _as_scores(score_id, "in-distribution")
    s_ood = _as_scores(score_ood, "OOD")
    # round() guards against tpr * N landing a hair above an integer (e.g. 0.95 * 20 = 19.000000000000004).
    k = max(1, math.ceil(round(tpr * s_id.size, 9)))
    threshold = np.sort(s_id)[::-1][k - 1]
    return float(np.mean(s_ood >= threshold))


def ood_metrics(score_id: ArrayLike, score_ood: ArrayLike) -> dict[str, float]:
    """All metrics for one (ID, OOD) pair: ``{"auroc": ..., "auprc": ..., "fpr95": ...}``.

    Args:
        score_id: (N_id,) in-distribution scores, higher = more ID.
        score_ood: (N_ood,) OOD scores.
    """
    s_id, s_ood = _as_scores(score_id, "in-distribution"), _as_scores(score_ood, "OOD")
    groups = _tie_groups(s_id, s_ood)  # one sort serves both areas
    return {"auroc": _auroc(*groups), "auprc": _auprc(*groups), "fpr95": fpr_at_tpr(s_id, s_ood, 0.95)}
