"""The :class:`Density` contract, the two registries (densities and other fitted scores) and the factories.

The implementations live beside this module (:mod:`.gmm`, :mod:`.kde`, :mod:`.baselines`); importing the package
:mod:`densitune.search.ood.densities` imports them all, which registers every name before any factory is called.
"""

from __future__ import annotations

import abc
import inspect
import json
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor

from densitune.errors import ConfigError, DensituneError, NotFittedError
from densitune.registry import Registry
from densitune.search.ood.densities._linalg import as_features

__all__ = ["DENSITIES", "FITTED_SCORES", "Density", "create_density", "density_from_state"]

#: name -> factory taking keyword parameters and returning an unfitted :class:`Density`.
DENSITIES: Registry[Callable[..., Density]] = Registry("density")
#: The scores fitted on training features like a density (knn, rmd, vim; :mod:`.baselines`):
#: built, fitted, saved and cached by the same functions, but not densities (never in a spec's ``densities``).
FITTED_SCORES: Registry[Callable[..., Density]] = Registry("fitted score")


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
        z64 = as_features(z)
        if z64.shape[1] != self.n_features_in_:
            raise DensituneError(
                f"features have dimension {z64.shape[1]}, the density was fitted on {self.n_features_in_}"
            )
        return z64

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"


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
