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

Glossary: in densitune a *density* is a fitted model of log q(z) over features, registered in :data:`DENSITIES`
and named in a spec's ``densities``; knn, rmd and vim are *fitted scores*, not densities: they share the
:class:`Density` contract and the factories (so they are fitted, cached and saved alike) but are registered in
:data:`FITTED_SCORES` and used only by the score of the same name.

Modules: :mod:`._base` (the contract, both registries, :func:`create_density`, :func:`density_from_state`),
:mod:`._linalg` (jitter ladder, shrunk covariances, feature checks), :mod:`.gmm`, :mod:`.kde`, :mod:`.baselines`
(knn, rmd, vim). Importing this package imports every implementation, which registers each name; the torch-free
table of default parameters is :mod:`densitune.search.ood.density_defaults`.
"""

from __future__ import annotations

from densitune.search.ood.densities._base import DENSITIES, FITTED_SCORES, Density, create_density, density_from_state
from densitune.search.ood.densities._linalg import JITTERS, SHRINKAGES, cholesky_with_jitter, shrunk_covariance
from densitune.search.ood.densities.baselines import KNNScoreModel, RelativeMahalanobis, ViMModel, vim_default_dim
from densitune.search.ood.densities.gmm import ClassConditionalGaussian, GMMMax, GMMSum
from densitune.search.ood.densities.kde import GaussianKDE

__all__ = [
    "DENSITIES",
    "FITTED_SCORES",
    "JITTERS",
    "ClassConditionalGaussian",
    "Density",
    "GMMMax",
    "GMMSum",
    "GaussianKDE",
    "KNNScoreModel",
    "RelativeMahalanobis",
    "SHRINKAGES",
    "ViMModel",
    "cholesky_with_jitter",
    "create_density",
    "density_from_state",
    "shrunk_covariance",
    "vim_default_dim",
]
