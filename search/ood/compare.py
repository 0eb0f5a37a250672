"""Paired comparison of two scores on the same test samples: AUROC(A) − AUROC(B) with a 95 % interval.

"A vs B on the same networks" (ip vs ε = 0, GMM vs KDE, the note's method vs a baseline) is a *paired* question:
both scores rank the same ID and OOD test samples of the same networks, so their AUROCs are correlated and the
interval of the difference must keep the pairing.

- :func:`paired_bootstrap`: resamples the ID and the OOD test samples (the same indices for A and B, and for every
  seed: the test images are shared) and, with several seeds, the seeds too (with replacement); the statistic is the
  mean over the drawn seeds of AUROC_A − AUROC_B; percentile interval. Vectorised over resamples.
- :func:`delong`: DeLong, DeLong & Clarke-Pearson (1988), the asymptotic variance of a difference of correlated
  AUROCs from the structural components (midrank form of Sun & Xu 2014), for one seed; normal interval and
  two-sided p-value.

Scores: higher = more in-distribution; AUROC with ID positive, ties counted 1/2 (as
:func:`densitune.search.ood.metrics.auroc`). Pure numpy/scipy: no torch graph, no files.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.special import ndtri
from scipy.stats import norm, rankdata

from densitune.errors import DensituneError

#: (N,) or (S, N) scores: a numpy array or nested sequences of floats
ArrayLike = np.ndarray | Sequence[float] | Sequence[Sequence[float]]

__all__ = ["PairedDiff", "auroc_rows", "delong", "paired_bootstrap"]


@dataclass(frozen=True)
class PairedDiff:
    """AUROC(A) − AUROC(B) (mean over seeds) and its interval ``[low, high]`` at ``level``."""

    diff: float
    low: float
    high: float
    level: float
    method: str  # "bootstrap" or "delong"
    n_seeds: int
    auroc_a: float
    auroc_b: float
    p_value: float | None = None  # DeLong only

    @property
    def contains_zero(self) -> bool:
        """Whether the interval contains 0 (the difference is not established)."""
        return self.low <= 0.0 <= self.high


def auroc_rows(s_id: np.ndarray, s_ood: np.ndarray) -> np.ndarray:
    """AUROC of each row: (R, N) ID scores, (R, M) OOD scores -> (R,) (Mann-Whitney U / (N M), ties 1/2)."""
    n, m = s_id.shape[1], s_ood.shape[1]
    ranks = rankdata(np.concatenate([s_id, s_ood], axis=1), method="average", axis=1)
    u = ranks[:, :n].sum(axis=1) - n * (n + 1) / 2.0
    return np.asarray(u / (n * m), dtype=np.float64)


def _as_seeds(x: ArrayLike, what: str) -> np.ndarray:
    """(N,) or (S, N) scores -> (S, N) float64."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0 or arr.shape[0] == 0:
        raise DensituneError(f"{what} scores must have shape (N,) or (seeds, N), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DensituneError(f"{what} scores contain NaN or inf")
    return arr


def _check_pairs(
    a_id: ArrayLike, a_ood: ArrayLike, b_id: ArrayLike, b_ood: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    arrays = _as_seeds(a_id, "A ID"), _as_seeds(a_ood, "A OOD"), _as_seeds(b_id, "B ID"), _as_seeds(b_ood, "B OOD")
    if arrays[0].shape != arrays[2].shape or arrays[1].shape != arrays[3].shape:
        raise DensituneError("paired comparison: A and B must score the same samples (same shapes), got "
                             f"{arrays[0].shape}/{arrays[1].shape} and {arrays[2].shape}/{arrays[3].shape}")
    if arrays[0].shape[0] != arrays[1].shape[0]:
        raise DensituneError("ID and OOD scores must come from the same number of seeds")
    return arrays


def _take(x: np.ndarray, seeds: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """(S, K) scores, (r, S) drawn seeds, (r, K) drawn samples -> (r * S, K): each resample's seeds and samples."""
    r, s = seeds.shape
    out: np.ndarray = x[seeds[:, :, None], idx[:, None, :]].reshape(r * s, -1)
    return out


def paired_bootstrap(
    a_id: ArrayLike,
    a_ood: ArrayLike,
    b_id: ArrayLike,
    b_ood: ArrayLike,
    *,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    chunk: int = 256,
) -> PairedDiff:
    """Paired bootstrap interval of AUROC(A) − AUROC(B).

    Args:
        a_id, b_id: (N,) or (S, N) ID test scores of A and B (row s: seed s; column i: the same sample).
        a_ood, b_ood: (M,) or (S, M) OOD test scores.
        n_boot: resamples; level: interval coverage; seed: of the resampling.
        chunk: resamples computed at once (memory O(chunk x S x (N + M))).

    Returns:
        The full-data difference (mean over seeds) and the percentile interval of the resampled differences.
    """
    ai, ao, bi, bo = _check_pairs(a_id, a_ood, b_id, b_ood)
    s, n = ai.shape
    m = ao.shape[1]
    if n_boot < 1 or not 0 < level < 1:
        raise DensituneError(f"need n_boot >= 1 and 0 < level < 1, got {n_boot}, {level}")
    auc_a, auc_b = auroc_rows(ai, ao), auroc_rows(bi, bo)
    rng = np.random.default_rng(seed)
    diffs = []
    for start in range(0, n_boot, chunk):
        r = min(chunk, n_boot - start)
        idx_i = rng.integers(0, n, size=(r, n))
        idx_o = rng.integers(0, m, size=(r, m))
        seeds = rng.integers(0, s, size=(r, s)) if s > 1 else np.zeros((r, 1), dtype=np.int64)

        da = (auroc_rows(_take(ai, seeds, idx_i), _take(ao, seeds, idx_o))
              - auroc_rows(_take(bi, seeds, idx_i), _take(bo, seeds, idx_o)))
        diffs.append(da.reshape(r, s).mean(axis=1))
    d = np.concatenate(diffs)
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(d, [alpha, 1.0 - alpha])
    return PairedDiff(float((auc_a - auc_b).mean()), float(low), float(high), level, "bootstrap", s,
                      float(auc_a.mean()), float(auc_b.mean()))


def _structural_components(s_id: np.ndarray, s_ood: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong's V10 (per ID sample) and V01 (per OOD sample) for each row of (K, N), (K, M) scores."""
    n, m = s_id.shape[1], s_ood.shape[1]
    t_all = rankdata(np.concatenate([s_id, s_ood], axis=1), method="average", axis=1)
    t_id = rankdata(s_id, method="average", axis=1)
    t_ood = rankdata(s_ood, method="average", axis=1)
    v10 = (t_all[:, :n] - t_id) / m  # fraction of OOD samples below each ID sample (ties 1/2)
    v01 = 1.0 - (t_all[:, n:] - t_ood) / n  # fraction of ID samples above each OOD sample
    return v10, v01


def delong(
    a_id: ArrayLike, a_ood: ArrayLike, b_id: ArrayLike, b_ood: ArrayLike, *, level: float = 0.95
) -> PairedDiff:
    """DeLong's test for two correlated AUROCs on one seed: normal interval and two-sided p-value.

    Args:
        a_id, b_id: (N,) ID test scores of A and B on the same samples; a_ood, b_ood: (M,) OOD test scores.

    Returns:
        diff ± z_{(1+level)/2} · sqrt(Var) with Var = (s10_aa + s10_bb − 2 s10_ab) / N + (s01_aa + s01_bb − 2 s01_ab) / M
        from the covariances of the structural components.
    """
    ai, ao, bi, bo = _check_pairs(a_id, a_ood, b_id, b_ood)
    if ai.shape[0] != 1:
        raise DensituneError("DeLong's test compares one seed: use paired_bootstrap for several")
    n, m = ai.shape[1], ao.shape[1]
    if n < 2 or m < 2:
        raise DensituneError("DeLong's test needs at least 2 ID and 2 OOD samples")
    v10, v01 = _structural_components(np.concatenate([ai, bi]), np.concatenate([ao, bo]))
    auc = v10.mean(axis=1)
    s10, s01 = np.cov(v10), np.cov(v01)
    var = (s10[0, 0] + s10[1, 1] - 2 * s10[0, 1]) / n + (s01[0, 0] + s01[1, 1] - 2 * s01[0, 1]) / m
    diff = float(auc[0] - auc[1])
    sd = math.sqrt(max(float(var), 0.0))
    z = float(ndtri(0.5 + level / 2.0))
    p = float(2.0 * norm.sf(abs(diff) / sd)) if sd > 0 else (1.0 if diff == 0 else 0.0)
    return PairedDiff(diff, diff - z * sd, diff + z * sd, level, "delong", 1, float(auc[0]), float(auc[1]), p)
