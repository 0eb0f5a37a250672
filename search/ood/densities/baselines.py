"""The field's strongest simple baselines that are fitted on training features: kNN, RMD, ViM.

Each is a :class:`~densitune.search.ood.densities.Density` in form (``fit`` on the clean training features once,
``score_samples`` many times, differentiable w.r.t. the features, saved and cached like a density) so that the
search fits, caches and records it through the same path as the GMMs: its parameters are searched as
``density_params`` and written to the rows' ``density`` / ``density_params`` columns. It is *not* a density: it
is registered in ``FITTED_SCORES``, not ``DENSITIES``, used by the score of the same name in
:mod:`densitune.search.ood.scores`, and refused in a spec's ``densities``. Higher = more in-distribution, always.

========  ============================================================================  =========================
name      score (higher = more in-distribution), z (N, D) features                       source
========  ============================================================================  =========================
knn       −‖ẑ − ẑ_(k)‖₂, ẑ = z/‖z‖₂, ẑ_(k) its k-th nearest normalised training feature   Sun et al. 2022
rmd       −min_c (d_c(z) − d_0(z)), d = squared Mahalanobis distance to class c under    Ren et al. 2021
          the shared covariance, d_0 under one Gaussian fitted to all training features
vim       logsumexp_k l_k(z) − α ‖P⊥(z − u)‖₂, u = −W⁺b, P⊥ the residual of the top-d      Wang et al. 2022
          principal subspace of z − u, α = mean max logit / mean residual norm on train
========  ============================================================================  =========================

Every computation runs in float64 (cf. :mod:`densitune.search.ood.densities`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from densitune.errors import ConfigError, DensituneError
from densitune.search.ood.densities._base import FITTED_SCORES, Density
from densitune.search.ood.densities._linalg import ELEMENT_BUDGET, as_features, check_chunk_size, cholesky_with_jitter

__all__ = ["KNNScoreModel", "RelativeMahalanobis", "ViMModel", "vim_default_dim"]


def _check_labels(z64: Tensor, y: Tensor) -> Tensor:
    if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != z64.shape[0]:
        raise DensituneError(f"labels must be a (N,) tensor matching features {tuple(z64.shape)}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DensituneError(f"labels must be integers, got {y.dtype}")
    return y.to(z64.device)


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")


class _FittedScore(Density):
    """A score fitted like a density (registered in ``FITTED_SCORES``)."""


# ---------------------------------------------------------------------------------------------------------
# deep kNN (Sun et al. 2022)
# ---------------------------------------------------------------------------------------------------------


@FITTED_SCORES.register("knn")
class KNNScoreModel(_FittedScore):
    """Deep nearest neighbours (Sun et al. 2022): minus the distance of the L2-normalised feature to its k-th
    nearest L2-normalised training feature (every training row is kept, as pytorch-ood's ``KNN``).

    Distances are computed block by block (query x train rows) keeping a running top-k, so memory is
    O(chunk^2 + chunk x k). Differentiable w.r.t. the query features (through the k-th distance).

    Args:
        k: which neighbour (Sun et al. use 50 on CIFAR-10; pytorch-ood's default).
        chunk_size: rows per block; ``None`` uses sqrt(2**23) = 2896.

    Fitted attributes:
        train_ (N, D) float64 normalised training features, train_sq_ (N,) their squared norms, n_train_,
        n_features_in_ = D.
    """

    name = "knn"

    def __init__(self, *, k: int = 50, chunk_size: int | None = None) -> None:
        _positive_int("k", k)
        check_chunk_size(chunk_size)
        self.k = k
        self.chunk_size = chunk_size

    def get_params(self) -> dict[str, Any]:
        return {"k": self.k, "chunk_size": self.chunk_size}

    def fitted_summary(self) -> dict[str, Any]:
        return {"n_train_": self.n_train_}

    @staticmethod
    def _normalise(z64: Tensor) -> Tensor:
        norm: Tensor = z64.norm(dim=1, keepdim=True)
        return z64 / norm.clamp_min(1e-12)

    def fit(self, z: Tensor, y: Tensor | None = None) -> KNNScoreModel:
        """Store the normalised training features (N, D); ``y`` is ignored. Needs N >= k."""
        z64 = as_features(z).detach()
        if z64.shape[0] < self.k:
            raise DensituneError(f"knn: k={self.k} exceeds the number of training features ({z64.shape[0]})")
        self.train_ = self._normalise(z64)
        self.train_sq_ = self.train_.square().sum(1)
        self.n_train_ = int(z64.shape[0])
        self.n_features_in_ = int(z64.shape[1])
        return self

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 −(distance to the k-th nearest normalised training feature)."""
        q_all = self._normalise(self._check_query(z))
        rows = self.chunk_size or math.isqrt(ELEMENT_BUDGET)
        out = []
        for qs in range(0, q_all.shape[0], rows):
            q = q_all[qs : qs + rows]
            q_sq = q.square().sum(1, keepdim=True)
            best = q.new_empty(q.shape[0], 0)
            for ts in range(0, self.n_train_, rows):
                d2 = (q_sq + self.train_sq_[ts : ts + rows] - 2.0 * q @ self.train_[ts : ts + rows].mT).clamp_min(0.0)
                cand = torch.cat([best, d2], dim=1)
                best = cand.topk(min(self.k, cand.shape[1]), dim=1, largest=False).values  # ascending
            out.append(-best[:, self.k - 1].sqrt())
        if not out:
            return q_all.new_empty(0)
        return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------
# relative Mahalanobis distance (Ren et al. 2021)
# ---------------------------------------------------------------------------------------------------------


def _squared_mahalanobis(z64: Tensor, means: Tensor, chol: Tensor, rows: int) -> Tensor:
    """(M, D) features, (C, D) means, one (D, D) Cholesky factor -> (M, C) squared Mahalanobis distances."""
    out = []
    for start in range(0, z64.shape[0], rows):
        diff = z64[start : start + rows].unsqueeze(0) - means.unsqueeze(1)  # (C, m, D)
        w = torch.linalg.solve_triangular(chol, diff.mT, upper=False)  # (C, D, m)
        out.append(w.square().sum(1).mT)  # (m, C)
    if not out:
        return z64.new_empty(0, means.shape[0])
    return torch.cat(out)


@FITTED_SCORES.register("rmd")
class RelativeMahalanobis(_FittedScore):
    """Relative Mahalanobis distance (Ren et al. 2021): −min_c (d_c(z) − d_0(z)).

    d_c(z) = (z − mu_c)^T Sigma^-1 (z − mu_c) with class means mu_c and the shared covariance
    Sigma = sum_c sum_{i in c} (z_i − mu_c)(z_i − mu_c)^T / N (Lee et al. 2018); d_0 the same under one "background"
    Gaussian fitted to all training features, mean mu_0 and covariance Sigma_0 = sum_i (z_i − mu_0)(z_i − mu_0)^T / N.
    ``reg_covar`` is added to both diagonals; a covariance that still fails to factorise walks DDU's jitter ladder.

    pytorch-ood 0.4.0's ``RMD`` leaves both scatter matrices undivided by N (adding 1e-6 I to them): its score is
    this one divided by N when ``reg_covar = 1e-6 / N`` -- the same ranking (the tests check exactly that).

    Args:
        reg_covar: float >= 0 added to the diagonal of Sigma and Sigma_0.
        chunk_size: query rows per chunk; ``None``: about 2**23 float64 numbers per chunk.

    Fitted attributes:
        classes_ (C,), means_ (C, D), covariance_ (D, D), cholesky_ (D, D), background_mean_ (D,),
        background_covariance_ (D, D), background_cholesky_ (D, D), jitter_ (2,) (shared, background),
        n_features_in_ = D.
    """

    name = "rmd"

    def __init__(self, *, reg_covar: float = 0.0, chunk_size: int | None = None) -> None:
        if isinstance(reg_covar, bool) or not isinstance(reg_covar, (int, float)) or not math.isfinite(reg_covar) \
                or reg_covar < 0:
            raise ConfigError(f"reg_covar must be a finite number >= 0, got {reg_covar!r}")
        check_chunk_size(chunk_size)
        self.reg_covar = float(reg_covar)
        self.chunk_size = chunk_size

    def get_params(self) -> dict[str, Any]:
        return {"reg_covar": self.reg_covar, "chunk_size": self.chunk_size}

    def fitted_summary(self) -> dict[str, Any]:
        return {"n_classes_": int(self.classes_.numel()), "max_jitter_": float(self.jitter_.max())}

    def fit(self, z: Tensor, y: Tensor) -> RelativeMahalanobis:
        """Class means, shared and background covariances (divisor N) and their Cholesky factors."""
        z64 = as_features(z).detach()
        y = _check_labels(z64, y)
        n, d = z64.shape
        if n < 2:
            raise DensituneError("rmd needs at least 2 training features")
        classes = torch.unique(y, sorted=True)
        means = torch.stack([z64[y == c].mean(0) for c in classes.tolist()])
        centred = z64 - means[torch.searchsorted(classes, y)]
        eye = torch.eye(d, dtype=torch.float64, device=z64.device)
        shared = centred.mT @ centred / n + self.reg_covar * eye
        mu0 = z64.mean(0)
        c0 = z64 - mu0
        background = c0.mT @ c0 / n + self.reg_covar * eye
        covs = torch.stack([shared, background])
        covs = 0.5 * (covs + covs.mT)
        L, jitter = cholesky_with_jitter(covs)
        self.classes_ = classes.to(torch.int64)
        self.means_ = means
        self.covariance_, self.background_covariance_ = covs[0], covs[1]
        self.cholesky_, self.background_cholesky_ = L[0], L[1]
        self.background_mean_ = mu0
        self.jitter_ = jitter
        self.n_features_in_ = d
        return self

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 −min_c (d_c − d_0); differentiable w.r.t. ``z``."""
        z64 = self._check_query(z)
        c = self.means_.shape[0]
        rows = self.chunk_size or max(1, ELEMENT_BUDGET // ((c + 1) * self.n_features_in_))
        d_c = _squared_mahalanobis(z64, self.means_, self.cholesky_, rows)  # (M, C)
        d_0 = _squared_mahalanobis(z64, self.background_mean_.unsqueeze(0), self.background_cholesky_, rows)  # (M, 1)
        return -(d_c - d_0).min(dim=1).values


# ---------------------------------------------------------------------------------------------------------
# ViM (Wang et al. 2022)
# ---------------------------------------------------------------------------------------------------------


def vim_default_dim(d: int) -> int:
    """The principal dimension ViM's authors use: 1000 for D >= 2048, 512 for D >= 768, else D // 2."""
    if d >= 2048:
        return 1000
    if d >= 768:
        return 512
    return d // 2


@FITTED_SCORES.register("vim")
class ViMModel(_FittedScore):
    """Virtual-logit matching (Wang et al. 2022): energy of the logits minus the scaled residual norm.

    score(z) = logsumexp_k l_k(z) − alpha ‖(z − u) R‖₂ with l(z) = W z + b the classifier head, u = −W⁺ b (the
    feature with all-zero logits, least norm), R (D, D − d) the eigenvectors of the D − d smallest eigenvalues of
    the uncentred second moment of the training z − u (i.e. the residual of its top-d principal subspace), and
    alpha = mean_i max_k l_k(z_i) / mean_i ‖(z_i − u) R‖₂ over the training features.

    **Needs the classifier head**: the search passes the model's ``head`` (an ``nn.Linear``: ``head.weight``
    (C, D), ``head.bias`` (C,)) through :meth:`set_head` before :meth:`fit` (``needs_head``), so a model of one's
    own must expose its last layer as ``model.head``; the head is saved with the fitted state.

    Args:
        dim: principal subspace dimension d; ``None``: :func:`vim_default_dim`. As in pytorch-ood, a d >= D is
            replaced by D // 2 when fitted (``dim_`` records the value used).

    Fitted attributes:
        weight_ (C, D), bias_ (C,), origin_ (D,) = u, residual_ (D, D − d), alpha_ (float), dim_ (int),
        n_features_in_ = D.
    """

    name = "vim"
    needs_head: ClassVar[bool] = True
    weight_: Tensor
    bias_: Tensor

    def __init__(self, *, dim: int | None = None) -> None:
        _positive_int("dim", dim, allow_none=True)
        self.dim = dim

    def get_params(self) -> dict[str, Any]:
        return {"dim": self.dim}

    def fitted_summary(self) -> dict[str, Any]:
        return {"dim_": self.dim_, "alpha_": self.alpha_}

    def set_head(self, weight: Tensor, bias: Tensor) -> None:
        """The classifier head: weight (C, D), bias (C,) (kept in float64)."""
        if weight.ndim != 2 or bias.ndim != 1 or bias.shape[0] != weight.shape[0]:
            raise DensituneError(f"vim: head weight (C, D) and bias (C,) expected, got {tuple(weight.shape)} "
                                 f"and {tuple(bias.shape)}")
        self.weight_ = weight.detach().to(torch.float64).clone()
        self.bias_ = bias.detach().to(torch.float64).clone()

    def logits(self, z64: Tensor) -> Tensor:
        """(M, D) float64 -> (M, C) head logits."""
        out: Tensor = z64 @ self.weight_.mT + self.bias_
        return out

    def fit(self, z: Tensor, y: Tensor | None = None) -> ViMModel:
        """Origin, residual subspace and alpha from the training features; ``y`` is ignored."""
        if not hasattr(self, "weight_"):
            raise DensituneError("vim needs the classifier head: call set_head(W, b) before fit")
        z64 = as_features(z, "features").detach().to(self.weight_.device)
        n, d = z64.shape
        if d != self.weight_.shape[1]:
            raise DensituneError(f"vim: features have dimension {d}, the head takes {self.weight_.shape[1]}")
        if n == 0:
            raise DensituneError("cannot fit vim on zero samples")
        dim = self.dim if self.dim is not None else vim_default_dim(d)
        if dim >= d:
            dim = d // 2
        if dim < 1 and d > 1:
            dim = 1
        u = -(torch.linalg.pinv(self.weight_) @ self.bias_)
        x = z64 - u
        _, vecs = torch.linalg.eigh(x.mT @ x / n)  # ascending eigenvalues
        residual = vecs[:, : d - dim].contiguous()
        vnorm = (x @ residual).norm(dim=1)
        self.origin_ = u
        self.residual_ = residual
        self.alpha_ = float(self.logits(z64).max(1).values.mean() / vnorm.mean())
        self.dim_ = int(dim)
        self.n_features_in_ = d
        return self

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 energy − alpha · residual norm; differentiable w.r.t. ``z``."""
        z64 = self._check_query(z)
        energy = torch.logsumexp(self.logits(z64), dim=1)
        vnorm: Tensor = ((z64 - self.origin_) @ self.residual_).norm(dim=1)
        return energy - self.alpha_ * vnorm
