"""Shared numerics of the densities and fitted scores: the jitter ladder, shrunk covariances, feature checks.

Private to :mod:`densitune.search.ood.densities` (the public names are re-exported there). Every computation
runs in float64; see the package docstring for the dtype convention.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from densitune.checks import Interval, check_params
from densitune.errors import ConfigError, DensituneError

__all__ = ["CHUNK_SIZE", "ELEMENT_BUDGET", "JITTERS", "LOG_2PI", "SHRINKAGES", "as_features", "as_tensor",
           "check_chunk_size", "cholesky_with_jitter", "shrunk_covariance"]

#: DDU's jitter ladder (omegafragger/DDU, utils/gmm_utils.py): 0, the smallest normal float64, 1e-308 ... 1e-1.
JITTERS: tuple[float, ...] = (0.0, torch.finfo(torch.float64).tiny) + tuple(10.0**e for e in range(-308, 0))

# Rows x classes x dims (GMM) or query rows x train rows (KDE) held at once when ``chunk_size`` is None:
# 2**23 float64 elements = 64 MiB per intermediate.
ELEMENT_BUDGET = 2**23

LOG_2PI = math.log(2.0 * math.pi)


def as_tensor(a: Any) -> Any:
    """A numpy array as a CPU tensor (sharing memory); anything else unchanged."""
    import numpy as np

    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


def as_features(z: Tensor, what: str = "features") -> Tensor:
    """Check that ``z`` is a finite (N, D) tensor or numpy array and return it as a float64 tensor (differentiably)."""
    z = as_tensor(z)
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


#: query rows per chunk; None: about 2**23 float64 numbers per chunk
CHUNK_SIZE = [Interval(int, 1, None), None]


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise ConfigError unless ``chunk_size`` is a positive int or None."""
    check_params({"chunk_size": chunk_size}, {"chunk_size": CHUNK_SIZE})
