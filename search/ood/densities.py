"""Feature densities: log q(z) for features z = f_theta(x); higher = more in-distribution.

Every density is an sklearn-style estimator written in torch (cf. ``sklearn.neighbors.KernelDensity``):
``__init__`` stores keyword parameters, :meth:`Density.fit` learns state whose names end in ``_`` and returns
``self``, :meth:`Density.score_samples` returns one log-density per row.

Registered in :data:`DENSITIES` (build one with :func:`create_density`):

``gmm_sum``
    Class-conditional Gaussians summed over classes (the research note's Algorithm 1; DDU, Mukhoti et al. 2021,
    "Deep Deterministic Uncertainty"). ``prior=True`` (default) weights the classes by pi_c = |X_c| / |X| as the
    note does; ``prior=False`` is DDU's reference code (``logsumexp`` of the class log-likelihoods, no prior).
``gmm_max``
    The same per-class Gaussians, scored by the best class: log q(z) = max_c log N(z; mu_c, Sigma_c) (the note's
    §3.1 variant).
``kde``
    Class-agnostic Gaussian kernel density estimate on the training features (the note's GMM-vs-KDE table).

Dtype convention: every computation runs in float64 (DDU computes the covariances in float64 because float32
covariances of 512-2048 dim features are often not numerically positive definite). ``score_samples`` accepts
any floating dtype and always returns float64; the cast is part of the autograd graph, so the output is
differentiable w.r.t. float32 (or float16/bfloat16) inputs and the gradient comes back in the input's dtype.
This is what :func:`densitune.search.ood.perturb.perturb` needs.
"""

from __future__ import annotations

import abc
import inspect
import json
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from densitune.checks import BOOL, INTEGER, Interval, Options, check_params
from densitune.errors import ConfigError, DensituneError, NotFittedError
from densitune.registry import Registry

__all__ = [
    "DENSITIES",
    "FITTED_SCORES",
    "JITTERS",
    "ClassConditionalGaussian",
    "Density",
    "GaussianKDE",
    "SHRINKAGES",
    "cholesky_with_jitter",
    "shrunk_covariance",
    "create_density",
    "density_from_state",
]

#: name -> factory taking keyword parameters and returning an unfitted :class:`Density`.
DENSITIES: Registry[Callable[..., Density]] = Registry("density")
#: The scores fitted on training features like a density (knn, rmd, vim; :mod:`densitune.search.ood.baselines`):
#: built, fitted, saved and cached by the same functions, but not densities (never in a spec's ``densities``).
FITTED_SCORES: Registry[Callable[..., Density]] = Registry("fitted score")

#: DDU's jitter ladder (omegafragger/DDU, utils/gmm_utils.py): 0, the smallest normal float64, 1e-308 ... 1e-1.
JITTERS: tuple[float, ...] = (0.0, torch.finfo(torch.float64).tiny) + tuple(10.0**e for e in range(-308, 0))

# Rows x classes x dims (GMM) or query rows x train rows (KDE) held at once when ``chunk_size`` is None:
# 2**23 float64 elements = 64 MiB per intermediate.
_ELEMENT_BUDGET = 2**23

# KDE blocks without autograd: query rows x training rows of one reused float64 GEMM buffer (8 MiB). Measured
# at N = 10,000, D = 512, 1,000 queries, one thread: blocks from 128 x 2048 to 2896 x 2896 all took 0.15-0.17 s
# (the bare GEMM 0.14 s), 64 x 4096 0.21 s; this size keeps the buffer small at no cost in speed.
_KDE_QUERY_ROWS, _KDE_TRAIN_ROWS = 512, 2048

_LOG_2PI = math.log(2.0 * math.pi)


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def _as_tensor(a: Any) -> Any:
    """A numpy array as a CPU tensor (sharing memory); anything else unchanged."""
    import numpy as np

    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def _as_features(z: Tensor, what: str = "features") -> Tensor:
    """Check that ``z`` is a finite (N, D) tensor or numpy array and return it as a float64 tensor (differentiably)."""
    z = _as_tensor(z)
    if not isinstance(z, Tensor):
        raise DensituneError(f"{what} must be a torch.Tensor, got {type(z).__name__}")
    if z.ndim != 2:
        raise DensituneError(f"{what} must have shape (N, D), got {tuple(z.shape)}")
    if z.is_complex():
        raise DensituneError(f"{what} must be real, got {z.dtype}")
    if not torch.isfinite(z).all():
        raise DensituneError(f"{what} contain NaN or inf values")
    return z.to(torch.float64)


def cholesky_with_jitter(
    cov: Tensor,
    jitters: tuple[float, ...] = JITTERS,
    cholesky: Callable[[Tensor], tuple[Tensor, Tensor]] = torch.linalg.cholesky_ex,
) -> tuple[Tensor, Tensor]:
    """Lower Cholesky factor of ``cov`` (or of ``cov + j * I``), walking DDU's jitter ladder.

    DDU (Mukhoti et al. 2021, reference ``utils/gmm_utils.py``) retries a failed Cholesky with
    ``Sigma + j * I`` for ``j`` in :data:`JITTERS`. Their code caught ``RuntimeError`` and matched the message
    text, which silently broke when PyTorch reworded it (omegafragger/DDU issue #4). Here no exception is
    caught at all: ``torch.linalg.cholesky_ex`` reports a non-positive-definite matrix through ``info > 0``,
    and anything ``cholesky`` raises propagates unchanged.

    A jitter too small to change any diagonal entry in float64 (``cov_ii + j == cov_ii``) gives the same matrix
    as the previous attempt, which has already failed, so it is skipped without a decomposition; the outcome
    (and the recorded jitter) is the same as trying it, only faster.

    Args:
        cov: (..., D, D) symmetric matrices (float64 recommended).
        jitters: increasing ladder of values added to the diagonal; the first is tried as is.
        cholesky: ``(A) -> (L, info)`` like :func:`torch.linalg.cholesky_ex` (injectable for tests).

    Returns:
        ``(L, jitter)``: L (..., D, D) lower triangular with ``L @ L.mT == cov + jitter * I`` and
        jitter (...,) float64, the value used for each matrix (0 where ``cov`` itself factorised).

    Raises:
        DensituneError: if some matrix is still not positive definite after the last jitter.
    """
    if cov.ndim < 2 or cov.shape[-1] != cov.shape[-2]:
        raise DensituneError(f"cov must have shape (..., D, D), got {tuple(cov.shape)}")
    batch_shape = cov.shape[:-2]
    d = cov.shape[-1]
    flat = cov.reshape(-1, d, d)
    eye = torch.eye(d, dtype=cov.dtype, device=cov.device)

    first = jitters[0] if jitters else 0.0
    start = flat + first * eye if first != 0.0 else flat
    L, info = cholesky(start)
    L = L.clone()
    jitter = torch.full((flat.shape[0],), first, dtype=torch.float64, device=cov.device)
    for i in torch.nonzero(info != 0).flatten().tolist():
        last_diag = start[i].diagonal()
        for j in jitters[1:]:
            candidate = flat[i] + j * eye
            if torch.equal(candidate.diagonal(), last_diag):
                continue  # numerically the matrix that just failed
            last_diag = candidate.diagonal()
            L_i, info_i = cholesky(candidate)
            if int(info_i) == 0:
                L[i] = L_i
                jitter[i] = j
                break
        else:
            raise DensituneError(
                f"covariance {i} is not positive definite even with jitter {jitters[-1] if jitters else 0.0:g} "
                "added to its diagonal"
            )
    return L.reshape(cov.shape), jitter.reshape(batch_shape)


#: Covariance shrinkage options of the class-conditional Gaussians.
SHRINKAGES: tuple[str, ...] = ("none", "ledoit_wolf", "oas")


def shrunk_covariance(centred: Tensor, method: str) -> tuple[Tensor, Tensor]:
    """scikit-learn's Ledoit-Wolf or OAS shrunk covariance of centred rows, in torch (float64).

    Same estimate as ``sklearn.covariance.LedoitWolf().fit(X).covariance_`` / ``OAS().fit(X).covariance_``:
    (1 - s) S + s mu I with S = X^T X / n (maximum likelihood, divisor n) and mu = tr(S) / D;
    for D = 1 the coefficient is 0, as there.

    Args:
        centred: (n, D) rows minus their mean.
        method: ``"ledoit_wolf"`` or ``"oas"``.

    Returns:
        ((D, D) covariance, () shrinkage coefficient s in [0, 1]).
    """
    n, d = centred.shape
    emp = centred.mT @ centred / n
    zero = emp.new_zeros(())
    if d == 1:
        return emp, zero
    mu = emp.diagonal().sum() / d
    if method == "ledoit_wolf":  # sklearn.covariance.ledoit_wolf_shrinkage, in closed form
        beta_ = centred.square().sum(1).square().sum()  # sum of <X2.T, X2>
        delta_ = emp.square().sum()  # sum of squared <X.T, X> / n^2
        beta = (beta_ / n - delta_) / (d * n)
        delta = (delta_ - 2.0 * mu * emp.diagonal().sum() + d * mu**2) / d
        beta = torch.minimum(beta, delta)
        s = zero if float(beta) == 0.0 else beta / delta
    elif method == "oas":  # sklearn.covariance._shrunk_covariance._oas
        alpha = emp.square().mean()
        num = alpha + mu**2
        den = (n + 1) * (alpha - mu**2 / d)
        s = emp.new_ones(()) if float(den) == 0.0 else torch.clamp(num / den, max=1.0)
    else:
        raise ConfigError(f"shrinkage must be 'ledoit_wolf' or 'oas', got {method!r}")
    cov = (1.0 - s) * emp + s * mu * torch.eye(d, dtype=emp.dtype, device=emp.device)
    return cov, s


def _check_chunk_size(chunk_size: int | None) -> None:
    check_params({"chunk_size": chunk_size}, {"chunk_size": _CHUNK_SIZE})

#: query rows per chunk; None: about 2**23 float64 numbers per chunk
_CHUNK_SIZE = [Interval(int, 1, None), None]


# ---------------------------------------------------------------------------------------------------------
# base class
# ---------------------------------------------------------------------------------------------------------


class Density(abc.ABC):
    """A log-density over feature vectors; higher score = more in-distribution.

    Lifecycle, as the search drives it: the density is built once per trial from its parameters
    (:func:`create_density`), :meth:`fit` is called once on the features of the *training* split (extracted
    once, without augmentation, and shared by all trials), then :meth:`score_samples` is called many times: on
    the ID and OOD evaluation features, and inside the autograd graph of input perturbation
    (:func:`densitune.search.ood.perturb.perturb`), which differentiates it w.r.t. its input.

    Features and labels may be torch tensors or numpy arrays (a numpy array becomes a CPU tensor);
    scores are always a float64 tensor (``.numpy()`` for an array).
    """

    #: Registered name (set by subclasses / factories).
    name: str = "density"
    #: :meth:`fit` needs the classifier head: the search calls ``set_head(W (C, D), b (C,))`` first
    needs_head: ClassVar[bool] = False
    #: Feature dimension D, set by :meth:`fit` (absent before; :meth:`is_fitted` checks for it).
    n_features_in_: int

    @abc.abstractmethod
    def fit(self, z: Tensor, y: Tensor) -> Density:
        """Learn the density from training features; called once, before any scoring.

        Args:
            z: (N, D) features of the training split (any floating dtype; fitted state is float64).
            y: (N,) integer class labels (ignored by class-agnostic densities).

        Returns:
            ``self``.

        Raises:
            DensituneError: on NaN/inf features or shapes that do not match.
        """

    @abc.abstractmethod
    def score_samples(self, z: Tensor) -> Tensor:
        """Log-density of each row; called after :meth:`fit`, on evaluation features and inside perturbation.

        Args:
            z: (M, D) features, any floating dtype, on the device the density was fitted on.

        Returns:
            (M,) float64 log q(z), higher = more in-distribution; differentiable w.r.t. ``z``.

        Raises:
            NotFittedError: before :meth:`fit`.
            DensituneError: on NaN/inf features or a feature dimension different from the fitted one.
        """

    @abc.abstractmethod
    def get_params(self) -> dict[str, Any]:
        """The constructor parameters (what :func:`create_density` was given, with defaults filled in)."""

    def set_head(self, weight: Tensor, bias: Tensor) -> None:
        """Give the classifier head, weight (C, D) and bias (C,), to a density that :attr:`needs_head`
        (before :meth:`fit`); the others ignore it."""
        return None

    def is_fitted(self) -> bool:
        """Whether :meth:`fit` has been called."""
        return hasattr(self, "n_features_in_")

    def fitted_summary(self) -> dict[str, Any]:
        """Scalar fitted values worth recording with a result (e.g. KDE's ``bandwidth_``); empty before fit."""
        return {}

    def describe(self) -> dict[str, Any]:
        """What a result row records of this density: the columns ``density`` (its name),
        ``density_params`` (JSON of every constructor parameter, defaults included) and ``density_fit``
        (JSON of :meth:`fitted_summary`; None before :meth:`fit`). The one source of those columns."""
        return {
            "density": self.name,
            "density_params": json.dumps(self.get_params(), sort_keys=True),
            "density_fit": json.dumps(self.fitted_summary(), sort_keys=True) if self.is_fitted() else None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Name, parameters and fitted state (attributes ending in ``_``) as tensors and JSON scalars.

        ``torch.save`` of this dict is readable with ``torch.load(..., weights_only=True)``: saving and
        loading a fitted density never pickles (or unpickles) an object. Rebuild with :func:`density_from_state`.
        """
        self._check_fitted()
        fitted: dict[str, Any] = {}
        for key, value in vars(self).items():
            if key.endswith("_") and not key.startswith("_"):
                if not isinstance(value, Tensor | bool | int | float | str):
                    raise TypeError(f"{type(self).__name__}.{key} is a {type(value).__name__}, not a tensor or scalar")
                fitted[key] = value
        return {"name": self.name, "params": self.get_params(), "fitted": fitted}

    def _check_fitted(self) -> None:
        if not self.is_fitted():
            raise NotFittedError(f"{type(self).__name__} ({self.name}) must be fitted before score_samples")

    def _check_query(self, z: Tensor) -> Tensor:
        self._check_fitted()
        z64 = _as_features(z)
        if z64.shape[1] != self.n_features_in_:
            raise DensituneError(
                f"features have dimension {z64.shape[1]}, the density was fitted on {self.n_features_in_}"
            )
        return z64

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------------------------
# class-conditional Gaussians (DDU / note Algorithm 1)
# ---------------------------------------------------------------------------------------------------------


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
            AUROC by far less than 1e-3 (tests/test_covariance_reg.py).

    Fitted attributes:
        classes_ (C,) sorted class labels; counts_ (C,); means_ (C, D); covariances_ (C, D, D) the regularised
        estimate without jitter; shrinkage_ (C,) the shrinkage coefficients (0 without shrinkage);
        cholesky_ (C, D, D); jitter_ (C,) float64 jitter added to each Sigma_c (0 = none needed);
        log_prior_ (C,); n_features_in_ = D. All tensors are float64 except classes_/counts_ (int64).
    """

    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "aggregation": [Options(("sum", "max"))], "prior": [BOOL], "chunk_size": _CHUNK_SIZE,
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
        z64 = _as_features(z).detach()
        y = _as_tensor(y)
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
        self.log_norm_ = -torch.log(L.diagonal(dim1=-2, dim2=-1)).sum(-1) - 0.5 * d * _LOG_2PI
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
        rows = self.chunk_size or max(1, _ELEMENT_BUDGET // (n_classes * d))
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


# ---------------------------------------------------------------------------------------------------------
# Gaussian KDE
# ---------------------------------------------------------------------------------------------------------


@DENSITIES.register("kde")
class GaussianKDE(Density):
    """Isotropic Gaussian kernel density estimate on the (class-agnostic) training features.

    log q(z) = logsumexp_i(-||z - z_i||^2 / (2 h^2)) - log N - D/2 log(2 pi h^2),

    the same normalised density as ``sklearn.neighbors.KernelDensity(kernel="gaussian", bandwidth=h)``.

    Bandwidth rules (``bandwidth_`` is fitted on the N training rows kept after subsampling):

    - a positive float: h = bandwidth, used as is (on the raw features).
    - ``"scott"``: h = N^(-1/(D+4)) * sigma.
    - ``"silverman"``: h = (N (D+2) / 4)^(-1/(D+4)) * sigma.

    with sigma = sqrt(mean_d Var[z_d]) (per-feature variance with divisor N - 1), the root-mean-square feature
    standard deviation. sklearn uses the same factors *without* sigma, i.e. it assumes standardised data;
    network features are not standardised (their scale depends on the backbone, D and spectral norm), so the
    rules here are scale-aware: on features whose every dimension has unit variance they equal sklearn's
    value, and on isotropic data they equal ``scipy.stats.gaussian_kde``'s kernel width.

    Distances are computed block by block (query rows x train rows, both chunked) and the blocks are combined
    with a logsumexp, so memory is O(chunk^2), never O(M x N); features are centred on the training mean first
    to limit cancellation in ||z||^2 + ||z_i||^2 - 2 z.z_i. Without autograd (the usual scoring call) each block
    is one GEMM into a reused buffer followed by an in-place exp-sum, using -||z - z_i||^2 / (2 h^2) =
    z.z_i / h^2 - ||z_i||^2 / (2 h^2) - ||z||^2 / (2 h^2): the per-training-row bias and each query row's max
    offset ride in the GEMM's operands (a kept (N, D + 2) copy of the training rows), the last term is added once
    per row, and blocks are 512 x 2048 (8 MiB) by default; this runs within ~10 % of the bare float64 GEMM
    (bench/peers.py). A query that requires grad (input perturbation) takes the out-of-place path autograd can
    follow. Both are float64 throughout and equal the exact kernel sum to ~1e-12 nats.

    Args:
        bandwidth: positive float, ``"scott"`` or ``"silverman"``.
        max_train: keep at most this many training rows (uniform subsample without replacement, seeded by
            ``random_state``); ``None`` keeps all. Scoring cost is O(M x N x D).
        random_state: seed of the subsample.
        chunk_size: rows per block for both query and training rows; ``None`` uses 512 query x 2048 training
            rows without autograd and sqrt(2**23) = 2896 for both with it.

    Fitted attributes:
        train_ (N, D) float64 training features (centred), mean_ (D,), bandwidth_ (float), n_train_ (int),
        n_features_in_ = D.
    """

    name = "kde"
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "bandwidth": [Interval(float, 0, None, closed="neither"), Options(("scott", "silverman"))],
        "max_train": [Interval(int, 1, None), None],
        "random_state": [INTEGER],
        "chunk_size": _CHUNK_SIZE,
    }

    def __init__(
        self,
        *,
        bandwidth: float | str = "scott",
        max_train: int | None = None,
        random_state: int = 0,
        chunk_size: int | None = None,
    ) -> None:
        check_params({"bandwidth": bandwidth, "max_train": max_train, "random_state": random_state,
                      "chunk_size": chunk_size}, self._parameter_constraints)
        self.bandwidth = bandwidth
        self.max_train = max_train
        self.random_state = random_state
        self.chunk_size = chunk_size

    def get_params(self) -> dict[str, Any]:
        return {
            "bandwidth": self.bandwidth,
            "max_train": self.max_train,
            "random_state": self.random_state,
            "chunk_size": self.chunk_size,
        }

    def fitted_summary(self) -> dict[str, Any]:
        return {"bandwidth_": self.bandwidth_, "n_train_": self.n_train_}

    def fit(self, z: Tensor, y: Tensor | None = None) -> GaussianKDE:
        """Store (a seeded subsample of) the training features and fix ``bandwidth_``; ``y`` is ignored."""
        z64 = _as_features(z).detach()
        n, d = z64.shape
        if n == 0:
            raise DensituneError("cannot fit a density on zero samples")
        if self.max_train is not None and n > self.max_train:
            gen = torch.Generator(device="cpu").manual_seed(self.random_state)
            keep = torch.randperm(n, generator=gen)[: self.max_train].sort().values
            z64 = z64[keep.to(z64.device)]
            n = self.max_train
        if isinstance(self.bandwidth, str):
            if n < 2:
                raise DensituneError(f"bandwidth={self.bandwidth!r} needs at least 2 training rows, got {n}")
            sigma = math.sqrt(float(z64.var(dim=0, correction=1).mean()))
            if self.bandwidth == "scott":
                factor = n ** (-1.0 / (d + 4))
            else:
                factor = (n * (d + 2) / 4.0) ** (-1.0 / (d + 4))
            h = factor * sigma
            if not h > 0:
                raise DensituneError("training features have zero variance; use a numeric bandwidth")
        else:
            h = float(self.bandwidth)
        self.mean_ = z64.mean(dim=0)
        self.train_ = z64 - self.mean_
        self.train_sq_ = self.train_.square().sum(dim=1)  # (N,)
        self.bandwidth_ = h
        self.n_train_ = n
        self.n_features_in_ = d
        return self

    def score_samples(self, z: Tensor) -> Tensor:
        """(M, D) -> (M,) float64 log q(z); differentiable w.r.t. ``z``."""
        z64 = self._check_query(z) - self.mean_
        log_norm = -math.log(self.n_train_) - 0.5 * self.n_features_in_ * (_LOG_2PI + 2.0 * math.log(self.bandwidth_))
        if not (z64.requires_grad and torch.is_grad_enabled()):
            return self._score_no_grad(z64, log_norm)
        rows = self.chunk_size or math.isqrt(_ELEMENT_BUDGET)
        inv_two_h2 = 1.0 / (2.0 * self.bandwidth_**2)
        out = []
        for qs in range(0, z64.shape[0], rows):
            q = z64[qs : qs + rows]  # (m, D)
            q_sq = q.square().sum(dim=1, keepdim=True)  # (m, 1)
            partial = []
            for ts in range(0, self.n_train_, rows):
                t = self.train_[ts : ts + rows]  # (n, D)
                # ||q||^2 + ||t||^2 - 2 q.t in one fused GEMM (addmm): fewer passes over the (m, n) block
                d2 = torch.addmm(q_sq + self.train_sq_[ts : ts + rows], q, t.mT, alpha=-2.0).clamp_min(0.0)  # (m, n)
                partial.append(torch.logsumexp(d2 * -inv_two_h2, dim=1))  # (m,)
            out.append(torch.logsumexp(torch.stack(partial, dim=1), dim=1) + log_norm)
        if not out:
            return z64.new_empty(0)
        return torch.cat(out)

    #: (train_, bandwidth_, their (N, D + 2) GEMM operand): built on the first no-autograd score, never saved
    _gemm_cache: tuple[Tensor, float, Tensor] | None = None

    def _gemm_operand(self) -> Tensor:
        """(N, D + 2) float64 [t_i, -||t_i||^2 / (2 h^2), 1]: the training rows with the kernel's per-row bias and a
        column of ones, so one GEMM with a query block [z / h^2, 1, -offset] gives S - offset with no further pass.
        Kept for the fitted state it was built from (a refit or a loaded state builds it again)."""
        cached = self._gemm_cache
        if cached is None or cached[0] is not self.train_ or cached[1] != self.bandwidth_:
            t = self.train_
            op = t.new_empty(t.shape[0], t.shape[1] + 2)
            op[:, :-2] = t
            op[:, -2] = self.train_sq_ * (-0.5 / self.bandwidth_**2)
            op[:, -1] = 1.0
            self._gemm_cache = cached = (t, self.bandwidth_, op)
        return cached[2]

    @torch.no_grad()
    def _score_no_grad(self, z64: Tensor, log_norm: float) -> Tensor:
        """(M, D) centred float64 queries -> (M,) log q(z): GEMM blocks in one reused (m, n) buffer, exp in place.

        With S_i = z.t_i / h^2 - ||t_i||^2 / (2 h^2), log q = logsumexp_i S_i - ||z||^2 / (2 h^2) + log_norm. Per
        query block, the first training block's S gives each row's offset M (its max there: the largest term is
        exp(0) = 1); every later block's S - M comes out of one GEMM (the offset rides in the operands' extra
        columns) and is exponentiated and summed in place. Terms far below M underflow harmlessly (they are
        < e^-700 of a term already counted); a row whose later block rises so far above M that its sum overflows is
        redone for that block with its own max. Memory: the buffer, m x n float64, and the (N, D + 2) operand.
        """
        m_all, (n_all, d) = z64.shape[0], self.train_.shape
        q_rows = self.chunk_size or _KDE_QUERY_ROWS
        t_rows = self.chunk_size or _KDE_TRAIN_ROWS
        h2 = self.bandwidth_**2
        train = self._gemm_operand()  # (N, D + 2)
        n_blocks = -(-n_all // t_rows)
        buf = z64.new_empty(min(q_rows, m_all) * min(t_rows, n_all))
        out = z64.new_empty(m_all)
        for qs in range(0, m_all, q_rows):
            q = z64[qs : qs + q_rows]  # (m, D)
            m = q.shape[0]
            qa = q.new_empty(m, d + 2)  # [z / h^2, 1, -M]
            torch.mul(q, 1.0 / h2, out=qa[:, :d])
            qa[:, d] = 1.0
            qa[:, d + 1] = 0.0
            partial = z64.new_empty(n_blocks, m)  # (blocks, m): log sum_i exp(S_i - M) of each block
            offset = z64.new_zeros(m)
            for j, ts in enumerate(range(0, n_all, t_rows)):
                t = train[ts : ts + t_rows]  # (n, D + 2)
                n = t.shape[0]
                s = torch.mm(qa, t.mT, out=buf[: m * n].view(m, n))  # (m, n): S - M
                if j == 0:
                    offset = s.amax(dim=1)  # (m,)
                    s.sub_(offset.unsqueeze(1))
                    qa[:, d + 1] = -offset
                torch.sum(s.exp_(), dim=1, out=partial[j])
                partial[j].log_()
                over = torch.isinf(partial[j]) & (partial[j] > 0)
                if bool(over.any()):  # rare: this block lies > ~700 nats above the first one for these rows
                    rows = over.nonzero().squeeze(1)
                    s_over = torch.mm(qa[rows], t.mT)  # (r, n)
                    top = s_over.amax(dim=1, keepdim=True)
                    partial[j, rows] = (s_over - top).exp_().sum(dim=1).log_() + top.squeeze(1)
            out[qs : qs + m] = torch.logsumexp(partial, dim=0) + offset - q.square().sum(dim=1) * (0.5 / h2)
        return out.add_(log_norm)


# ---------------------------------------------------------------------------------------------------------
# factory
# ---------------------------------------------------------------------------------------------------------


def density_from_state(state: dict[str, Any], device: torch.device | str | None = None) -> Density:
    """A fitted density rebuilt from :meth:`Density.state_dict` (tensors moved to ``device`` when given).

    Raises:
        DensituneError: the state names an unknown density, bad parameters, or fitted values of the wrong kind.
    """
    if not isinstance(state, dict) or set(state) != {"name", "params", "fitted"}:
        raise DensituneError("not a saved density (expected the keys name, params, fitted)")
    density = create_density(state["name"], **state["params"])
    for key, value in state["fitted"].items():
        if not (isinstance(key, str) and key.endswith("_") and not key.startswith("_")):
            raise DensituneError(f"saved density {state['name']!r} has a bad fitted key {key!r}")
        if isinstance(value, Tensor):
            value = value.to(device) if device is not None else value
        elif not isinstance(value, bool | int | float | str):
            raise DensituneError(f"saved density {state['name']!r}: {key} is a {type(value).__name__}")
        setattr(density, key, value)
    if not density.is_fitted():
        raise DensituneError(f"saved density {state['name']!r} holds no fitted state")
    return density


def create_density(name: str, **params: Any) -> Density:
    """Build an unfitted density by registered name.

    Args:
        name: one of ``DENSITIES.names()`` (``gmm_max``, ``gmm_sum``, ``kde``), or of ``FITTED_SCORES.names()``
            (``knn``, ``rmd``, ``vim``: the fitted models of the scores of the same names).
        **params: keyword parameters of that density (see its docstring).

    Raises:
        UnknownNameError: ``name`` is not registered (the message lists the known names).
        ConfigError: an unknown parameter name or an invalid value.
    """
    factory = FITTED_SCORES.get(name) if name in FITTED_SCORES else DENSITIES.get(name)
    try:
        inspect.signature(factory).bind(**params)
    except TypeError as exc:
        accepted = ", ".join(p for p in inspect.signature(factory).parameters)
        raise ConfigError(f"bad parameters for density {name!r}: {exc}; accepted: {accepted}") from None
    return factory(**params)


# The fitted feature scores (knn, rmd, vim) register themselves in FITTED_SCORES; imported last (they build on this
# module) so that every registered name is known wherever densities are created or checked.
from densitune.search.ood import baselines as _baselines  # noqa: E402,F401
