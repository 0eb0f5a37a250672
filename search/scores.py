"""OOD scores: per-input numbers where HIGHER = MORE IN-DISTRIBUTION, always.

A :class:`Score` is built for one trained model (and, when it uses one, a fitted
density). It is a differentiable function of the input, so the input perturbation
(:func:`search.perturb.perturb`) can follow its gradient, and it may offer a fast
path on clean, cached features.
"""

from __future__ import annotations

import abc
from typing import ClassVar

from torch import Tensor, nn

from search.densities import Density
from trainables.errors import ConfigError
from trainables.registry import Registry

SCORES: Registry = Registry("score")


class Score(abc.ABC):
    """An OOD score of one model. Higher = more in-distribution.

    The search builds one per (model, density) and calls :meth:`__call__` on
    (perturbed) input batches, or :meth:`from_features` on cached clean features.
    """

    uses_density: ClassVar[bool] = True

    def __init__(self, model: nn.Module, density: Density | None) -> None:
        if self.uses_density and density is None:
            raise ConfigError(f"score {type(self).__name__} needs a density")
        self.model = model
        self.density = density

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> (N,) scores, differentiable w.r.t. x."""

    def from_features(self, z: Tensor, logits: Tensor) -> Tensor | None:
        """Scores from clean features z (N, D) and logits (N, K), or None if this score needs the input."""
        return None

    def perturbation_score(self, x: Tensor) -> Tensor:
        """The function whose gradient sign moves inputs (default: the score itself)."""
        return self(x)


@SCORES.register("density")
class DensityScore(Score):
    """log q(f(x)): the feature log-density (DDU; the research note's U(x))."""

    def __call__(self, x: Tensor) -> Tensor:
        return self.density.score_samples(self.model.features(x))

    def from_features(self, z: Tensor, logits: Tensor) -> Tensor:
        return self.density.score_samples(z)


def create_score(name: str, model: nn.Module, density: Density | None) -> Score:
    """Build the registered score ``name`` for ``model`` (unknown names list the known ones)."""
    return SCORES.get(name)(model, density)
