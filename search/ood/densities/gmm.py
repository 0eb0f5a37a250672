"""Class-conditional Gaussians (DDU / the research note's Algorithm 1), registered as ``gmm_sum`` and ``gmm_max``."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from densitune.checks import BOOL, Interval, Options, check_params
from densitune.errors import DensituneError
from densitune.search.ood.densities._base import DENSITIES, Density
from densitune.search.ood.densities._linalg import (
    CHUNK_SIZE,
    ELEMENT_BUDGET,
    LOG_2PI,
    SHRINKAGES,
    as_features,
    as_tensor,
    cholesky_with_jitter,
    shrunk_covariance,
)

__all__ = ["ClassConditionalGaussian", "GMMMax", "GMMSum"]


class ClassConditionalGaussian(Density):
    """One full-covariance Gaussian per class, aggregated over classes by a sum or a max.

    Fit (the note's Algorithm 1, step 2; DDU ``gmm_fit``), in float64:
    mu_c = mean of the class-c features, Sigma_c = sample covariance with divisor |X_c| - 1,
    pi_c = |X_c| / |X|; L_c = Cholesky factor of Sigma_c (+ jitter, see :func:`cholesky_with_jitter`).

    Covariance regularisation (both off by default, which is DDU's and the note's estimate):

    - ``shrinkage="ledoit_wolf"`` / ``"oas"``: Sigma_c is scikit-learn's ``LedoitWolf().fit(X_c).covariance_`` /
      ``OAS().fit(X_c).covariance_``: (1 - s_c) S_c + s_c (tr S_c / D) I with S_c the maximum-likelihood covariance
      (divisor |X_c|, as scikit-learn) and s_c the Ledoit-Wolf (2004) / Chen et al. (2010) coefficient
      (``shrinkage_`` records each).
    - ``reg_covar``: then added to the diagonal, Sigma_c + reg_covar I, as ``sklearn.mixture.GaussianMixture``
      does after each M step. A matrix that still fails to factorise walks the jitter ladder on top of it.

    Score, with log N_c(z) = -1/2 ||L_c^{-1}(z - mu_c)||^2 - sum_i log (L_c)_ii - D/2 log 2 pi:

    - ``aggregation="sum"``, ``prior=True``: log q(z) = logsumexp_c(log pi_c + log N_c(z)) -- the note's
      q(z) = sum_c pi_c N(z | mu_c, Sigma_c).
    - ``aggregation="sum"``, ``prior=False``: logsumexp_c log N_c(z) -- DDU's reference score (no class prior;
      its classes are balanced, where it equals the above plus the constant log C).
    - ``aggregation="max"``, ``prior=False``: max_c log N_c(z) -- the note's p(x) = max_c N(x | mu_c, Sigma_c).
    - ``aggregation="max"``, ``prior=True``: max_c (log pi_c + log N_c(z)) (the MAP class's joint density).

    The Mahalanobis term is a batched triangular solve over classes, chunked over query rows, so memory is
    O(chunk * C * D) rather than O(M * C * D).

    Args:
        aggregation: ``"sum"`` or ``"max"``.
        prior: weight classes by pi_c.
        chunk_size: query rows per chunk; ``None`` picks rows so a chunk holds about 2**23 float64 numbers.
        reg_covar: float >= 0 added to each covariance's diagonal.
        shrinkage: ``"none"``, ``"ledoit_wolf"`` or ``"oas"``.
        dtype: ``"float64"`` (default) or ``"float32"``: the dtype of the scoring arithmetic (the difference to the
            means and the triangular solve, about twice as fast). Fitting always runs in float64 and the output is
            float64; on features whose class covariances have condition numbers near 1e8 the float32 path moves
            AUROC by far less than 1e-3 (tests/ood/test_covariance_regularisation.py).

    Fitted attributes:
        classes_ (C,) sorted class labels; counts_ (C,); means_ (C, D); covariances_ (C, D, D) the regularised
        estimate without jitter; shrinkage_ (C,) the shrinkage coefficients (0 without shrinkage);
        cholesky_ (C, D, D); jitter_ (C,) float64 jitter added to each Sigma_c (0 = none needed);
        log_prior_ (C,); n_features_in_ = D. All tensors are float64 except classes_/counts_ (int64).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "aggregation": [Options(("sum", "max"))], "prior": [BOOL], "chunk_size": CHUNK_SIZE,
        "reg_covar": [Interval(float, 0, None)], "shrinkage": [Options(SHRINKAGES)],
        "dtype": [Options(("float64", "float32"))],
    }

    def __init__(
        self,
        *,
        aggregation: str = "sum",
        prior: bool = True,
        chunk_size: int | None = None,
        reg_covar: float = 0.0,
        shrinkage: str = "none",
        dtype: str = "float64",
    ) -> None:
        # Validated here rather than in fit (as sklearn would) so create_density fails before any work.
        check_params({"aggregation": aggregation, "prior": prior, "chunk_size": chunk_size, "reg_covar": reg_covar,
                      "shrinkage": shrinkage, "dtype": dtype}, self._parameter_constraints)
        self.dtype = dtype
        self.aggregation = aggregation
        self.prior = prior
        self.chunk_size = chunk_size
        self.reg_covar = float(reg_covar)
        self.shrinkage = shrinkage
        self.name = f"gmm_{aggregation}"

    def get_params(self) -> dict[str, Any]:
        return {"aggregation": self.aggregation, "prior": self.prior, "chunk_size": self.chunk_size,
                "reg_covar": self.reg_covar, "shrinkage": self.shrinkage, "dtype": self.dtype}

    def fitted_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n_classes_": int(self.classes_.numel()), "max_jitter_": float(self.jitter_.max())}
        if self.shrinkage != "none":  # rows of unregularised fits keep their old summary
            out["mean_shrinkage_"] = float(self.shrinkage_.mean())
        return out

    def fit(self, z: Tensor, y: Tensor) -> ClassConditionalGaussian:
        """Per-class mean, covariance (divisor |X_c| - 1), prior and jittered Cholesky factor; see the class doc."""
        z64 = as_features(z).detach()
        y = as_tensor(y)
        if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != z64.shape[0]:
            raise DensituneError(f"labels must be a (N,) tensor matching features {tuple(z64.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise DensituneError(f"labels must be integers, got {y.dtype}")
        y = y.to(z64.device)
        classes, counts = torch.unique(y, sorted=True, return_counts=True)
        if classes.numel() == 0:
            raise DensituneError("cannot fit a density on zero samples")
        if int(counts.min()) < 2:
            bad = classes[counts < 2].tolist()
            raise DensituneError(f"classes {bad} have fewer than 2 samples; their covariance is undefined")
        n, d = z64.shape
        means = torch.empty(classes.numel(), d, dtype=torch.float64, device=z64.device)
        covs = torch.empty(classes.numel(), d, d, dtype=torch.float64, device=z64.device)
        shrink = torch.zeros(classes.numel(), dtype=torch.float64, device=z64.device)
        eye = torch.eye(d, dtype=torch.float64, device=z64.device)
        for k, c in enumerate(classes.tolist()):
            zc = z64[y == c]
            means[k] = zc.mean(dim=0)
            centred = zc - means[k]
            if self.shrinkage == "none":
                cov = centred.mT @ centred / (zc.shape[0] - 1)
            else:
                cov, shrink[k] = shrunk_covariance(centred, self.shrinkage)
            cov = cov + self.reg_covar * eye if self.reg_covar else cov
            covs[k] = 0.5 * (cov + cov.mT)  # exact symmetry for the factorisation
        L, jitter = cholesky_with_jitter(covs)
        self.shrinkage_ = shrink

        self.classes_ = classes.to(torch.int64)
        self.counts_ = counts.to(torch.int64)
        self.means_ = means
        self.covariances_ = covs
        self.cholesky_ = L
        self.jitter_ = jitter
        self.log_prior_ = torch.log(counts.to(torch.float64) / n)
        # log-normaliser of each class: -sum log diag L_c - D/2 log 2 pi
        self.log_norm_ = -torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1) - 0.5 * d * LOG_2PI
        self.n_features_in_ = d
        return self

    def class_log_likelihood(self, z: Tensor) -> Tensor:
        """log N(z; mu_c, Sigma_c) for every class.

        Args:
            z: (M, D) features, any floating dtype.

        Returns:
            (M, C) float64, differentiable w.r.t. ``z``; column order follows ``classes_``.
        """
        z64 = self._check_query(z)
        n_classes, d = self.means_.shape
        rows = self.chunk_size or max(1, ELEMENT_BUDGET // (n_classes * d))
        if self.dtype == "float32":
            zq, means, chol = z64.to(torch.float32), self.means_.to(torch.float32), self.cholesky_.to(torch.float32)
        else:
            zq, means, chol = z64, self.means_, self.cholesky_
        out = []
        for start in range(0, zq.shape[0], rows):
            block = zq[start : start + rows]  # (m, D)
            diff = block.unsqueeze(0) - means.unsqueeze(1)  # (C, m, D)
            # L_c^{-1} (z - mu_c) for all classes at once: solve L_c W = diff^T, W (C, D, m)
            w = torch.linalg.solve_triangular(chol, diff.mT, upper=False)
            maha = w.square().sum(dim=1).to(torch.float64)  # (C, m)
            out.append((self.log_norm_.unsqueeze(1) - 0.5 * maha).mT)  # (m, C)
        if not out:
            return z64.new_empty(0, n_classes)
        return torch.cat(out, dim=0)

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 log q(z), aggregated as configured; differentiable w.r.t. ``z``."""
        ll = self.class_log_likelihood(z)
        if self.prior:
            ll = ll + self.log_prior_
        if self.aggregation == "sum":
            return torch.logsumexp(ll, dim=1)
        return ll.max(dim=1).values


def _registered_gmm(name: str, aggregation: str, prior: bool, doc: str) -> type[ClassConditionalGaussian]:
    """The class registered as ``name``: :class:`ClassConditionalGaussian` with ``aggregation`` fixed by the
    name (so ``get_params()`` leaves it out and ``create_density(name, **get_params())`` round-trips)."""
    default_prior = prior

    class Registered(ClassConditionalGaussian):
        def __init__(
            self,
            *,
            prior: bool = default_prior,
            chunk_size: int | None = None,
            reg_covar: float = 0.0,
            shrinkage: str = "none",
            dtype: str = "float64",
        ) -> None:
            super().__init__(aggregation=aggregation, prior=prior, chunk_size=chunk_size, reg_covar=reg_covar,
                             shrinkage=shrinkage, dtype=dtype)

        def get_params(self) -> dict[str, Any]:
            params = super().get_params()
            del params["aggregation"]
            return params

    cls_name = {"sum": "GMMSum", "max": "GMMMax"}[aggregation]
    Registered.__name__ = Registered.__qualname__ = cls_name
    Registered.__doc__ = doc
    DENSITIES.add(name, Registered)
    return Registered


GMMSum = _registered_gmm("gmm_sum", "sum", True,
                         "log q(z) = logsumexp_c(log pi_c + log N_c(z)); ``prior=False`` is DDU's score.")
GMMMax = _registered_gmm("gmm_max", "max", False, "log q(z) = max_c log N_c(z) (the note's §3.1 variant); "
                                                   "``prior=True`` adds log pi_c inside the max.")
