"""OOD scores: per-input numbers where HIGHER = MORE IN-DISTRIBUTION, always.

A :class:`Score` is built for one trained model, or for every seed of a model group
(the ensemble scores), plus a fitted density when it uses one. It is a
differentiable function of the input, so that the input perturbation ("ip",
:func:`densitune.search.ood.perturb.perturb`) can follow its gradient, and it may offer a fast
path on clean, cached features.

The perturbation always climbs the gradient of the score being reported: for
``density`` (and ``diff``) that is the research note's x̃ = x + ε·sign(∇ log q(f(x)));
for ``msp`` it is ODIN's input preprocessing (Liang et al. 2018) without temperature.

=================== ============================================================ =========
name                score (higher = more in-distribution)                         source
=================== ============================================================ =========
density             log q(f(x))                                                   DDU; note Alg. 1
diff                log q(f(x̃)) − log q(f(x))  (needs ε > 0)                     note §1.6
msp                 max_k softmax(g(x))_k                                         Hendrycks & Gimpel 2017
entropy             −H(softmax(g(x)))                                             predictive entropy
gradnorm            ‖∂ KL(u ‖ softmax(g(x))) / ∂W‖₁ = ‖h‖₁ · Σ_k |K·p_k − 1|      Huang et al. 2021
ensemble_msp        max_k mean_m softmax(g_m(x))_k                                Lakshminarayanan 2017
ensemble_entropy    −H(mean_m softmax(g_m(x)))                                    Lakshminarayanan 2017
energy              logsumexp_k g_k(x)  (minus the energy at T = 1)               Liu et al. 2020
rmd                 −min_c (d_c(f(x)) − d_0(f(x))), relative Mahalanobis          Ren et al. 2021
knn                 −‖ẑ − ẑ_(k)‖, ẑ = f(x)/‖f(x)‖, k-th nearest training feature  Sun et al. 2022
vim                 logsumexp_k g_k(x) − α ‖residual of f(x) − u‖                 Wang et al. 2022
=================== ============================================================ =========

``rmd``, ``knn`` and ``vim`` are fitted on the clean training features through the density path: each uses the
one fitted model of the same name in :mod:`densitune.search.ood.densities.baselines` (``density_name``), whose parameters
(``k``; ``reg_covar``; ``dim``) are searched as that name's ``density_params``. ``vim`` needs the model's
classifier head as ``model.head`` (an ``nn.Linear``); the search hands it over when fitting.
"""

from __future__ import annotations

import abc
from collections.abc import Iterator, Mapping, Sequence
from types import MappingProxyType
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from densitune.errors import ConfigError
from densitune.registry import Registry
from densitune.search.ood.densities import Density
from densitune.search.ood.perturb import apply_sign, gradient_sign, perturb


@runtime_checkable
class FeatureModel(Protocol):
    """What a network must offer to be scored: any ``nn.Module`` with these three methods.

    ``densitune.trainables``' backbones implement it; so can one's own model. Inputs x are
    (N, C, H, W) images in [0, 1] (normalisation lives inside the model, so ε is in pixel units).
    """

    def __call__(self, x: Tensor) -> Tensor:
        """(N, K) logits."""
        ...

    def features(self, x: Tensor) -> Tensor:
        """(N, D) features z, the input of the final linear layer (what the density models)."""
        ...

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """((N, D) features, (N, K) logits) from one forward pass."""
        ...

    def modules(self) -> Iterator[nn.Module]:
        """The network's modules (``nn.Module.modules``)."""
        ...

SCORES: Registry[type[Score]] = Registry("score")


class Score(abc.ABC):
    """An OOD score. Higher = more in-distribution.

    The search builds one per (model or model group, density) and calls
    :meth:`evaluate` on input batches, or :meth:`from_features` on cached clean
    features when ε = 0.
    """

    #: needs a fitted density (``density`` is then passed to ``__init__``)
    uses_density: ClassVar[bool] = False
    #: takes every seed of a model group (otherwise exactly one model)
    ensemble: ClassVar[bool] = False
    #: only defined with input perturbation (ε > 0)
    needs_ip: ClassVar[bool] = False
    #: the one registered fitted model this score uses (e.g. ``"knn"``) instead of the spec's densities
    density_name: ClassVar[str | None] = None

    def __init__(self, models: Sequence[FeatureModel], density: Density | None = None) -> None:
        name = type(self).__name__
        if not models:
            raise ConfigError(f"score {name} needs at least one model")
        if not self.ensemble and len(models) != 1:
            raise ConfigError(f"score {name} takes one model, got {len(models)}")
        if self.uses_density and density is None:
            raise ConfigError(f"score {name} needs a fitted density")
        if self.density_name is not None and (density is None or density.name != self.density_name):
            got = density.name if density is not None else None
            raise ConfigError(f"score {name} needs a fitted {self.density_name!r}, got {got!r}")
        self.models = list(models)
        self.model = self.models[0]
        self.density = density

    @abc.abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """x (N, C, H, W) in [0, 1] -> (N,) scores, differentiable w.r.t. x."""

    def get_params(self) -> dict[str, Any]:
        """The score's own parameters (keywords of :func:`create_score` beyond models and density):
        ``create_score(name, models, density, **score.get_params())`` rebuilds an equal score."""
        return {}

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor | None:
        """Scores from clean (z (N, D), logits (N, K)) of each model, or None if the input is needed."""
        return None

    def perturbation_score(self, x: Tensor) -> Tensor:
        """The (N,) function whose gradient sign moves the inputs (default: the score itself)."""
        return self(x)

    def evaluate(self, x: Tensor, eps: float) -> Tensor:
        """(N,) scores of the inputs after perturbation with ``eps`` (ε = 0: none), detached."""
        if self.needs_ip and eps <= 0:
            raise ConfigError(f"score {type(self).__name__} needs eps > 0")
        x = perturb(x, self.perturbation_score, eps)
        with torch.no_grad():
            return self(x).detach()

    def gradient_sign(self, x: Tensor) -> Tensor:
        """(N, C, H, W) int8 sign of the perturbation's gradient at x: the same for every ε, so it can be kept."""
        return gradient_sign(x, self.perturbation_score)

    def evaluate_signed(self, x: Tensor, sign: Tensor, eps: float) -> Tensor:
        """:meth:`evaluate` from a precomputed :meth:`gradient_sign` (N, C, H, W): one forward pass, same numbers."""
        if self.needs_ip and eps <= 0:
            raise ConfigError(f"score {type(self).__name__} needs eps > 0")
        x = apply_sign(x, sign, eps)
        with torch.no_grad():
            return self(x).detach()


def _log_softmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.double(), dim=1)


def _neg_entropy(logp: Tensor) -> Tensor:
    """Σ_k p_k log p_k = −H(p), from (N, K) log-probabilities."""
    return (logp.exp() * logp).sum(1)


@SCORES.register("density")
class DensityScore(Score):
    """log q(f(x)): the feature log-density (DDU; the research note's U(x))."""

    uses_density = True
    #: never None: ``Score.__init__`` requires a density when ``uses_density``
    density: Density

    def __call__(self, x: Tensor) -> Tensor:
        return self.density.score_samples(self.model.features(x))

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor | None:
        ((z, _),) = feats
        return self.density.score_samples(z)


@SCORES.register("diff")
class DiffScore(DensityScore):
    """log q(f(x̃)) − log q(f(x)): how much the perturbation raised the density (note §1.6)."""

    needs_ip = True

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> None:
        return None

    def evaluate(self, x: Tensor, eps: float) -> Tensor:
        if eps <= 0:
            raise ConfigError("score diff needs eps > 0")
        x_t = perturb(x, self.perturbation_score, eps)
        with torch.no_grad():
            return (self(x_t) - self(x)).detach()

    def evaluate_signed(self, x: Tensor, sign: Tensor, eps: float) -> Tensor:
        if eps <= 0:
            raise ConfigError("score diff needs eps > 0")
        x_t = apply_sign(x, sign, eps)
        with torch.no_grad():
            return (self(x_t) - self(x)).detach()


class NegatedDiffScore(DiffScore):
    """−(log q(f(x̃)) − log q(f(x))), named ``diff_neg``: ``diff`` with the other sign, the same x̃. Still higher =
    more in-distribution: where OOD inputs gain more log-density from the step than ID inputs (``diff`` on the
    digits), gaining less is the in-distribution sign. Not registered in :data:`SCORES` (never searched by name):
    ``search --orient validation`` adds it beside a ``diff`` trial whose validation AUROC says it ranks better
    (:data:`ORIENTED`)."""

    def evaluate(self, x: Tensor, eps: float) -> Tensor:
        return -super().evaluate(x, eps)

    def evaluate_signed(self, x: Tensor, sign: Tensor, eps: float) -> Tensor:
        return -super().evaluate_signed(x, sign, eps)


#: Scores whose sign convention is open to question -> their separately named negated variant
#: (``search --orient validation``); the original is never flipped.
ORIENTED: Mapping[str, str] = MappingProxyType({"diff": "diff_neg"})
_VARIANTS: Mapping[str, type[Score]] = MappingProxyType({"diff_neg": NegatedDiffScore})


@SCORES.register("msp")
class MaxSoftmax(Score):
    """Maximum softmax probability (the softmax baseline)."""

    def __call__(self, x: Tensor) -> Tensor:
        return _log_softmax(self.model(x)).exp().max(1).values

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        ((_, logits),) = feats
        return _log_softmax(logits).exp().max(1).values


@SCORES.register("entropy")
class NegEntropy(Score):
    """Negative predictive entropy −H(softmax(g(x))) of one model."""

    def __call__(self, x: Tensor) -> Tensor:
        return _neg_entropy(_log_softmax(self.model(x)))

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        ((_, logits),) = feats
        return _neg_entropy(_log_softmax(logits))


def gradnorm_from_features(z: Tensor, logits: Tensor) -> Tensor:
    """GradNorm (Huang et al. 2021) in closed form, batched: (N, D), (N, K) -> (N,).

    The official code back-propagates loss = Σ_k −log softmax_k(g(x)) (an all-ones
    target, T = 1) one input at a time and takes the L1 norm of the gradient of the
    last layer's weight W (K, D). That gradient is (K·p − 1) hᵀ, with h the head's
    input (here the features z), so its L1 norm is ‖h‖₁ · Σ_k |K·p_k − 1|.
    """
    p = _log_softmax(logits).exp()
    k = logits.shape[1]
    return z.double().abs().sum(1) * (k * p - 1).abs().sum(1)


@SCORES.register("gradnorm")
class GradNorm(Score):
    """GradNorm: L1 norm of the last layer's weight gradient of KL(uniform ‖ softmax)."""

    def __call__(self, x: Tensor) -> Tensor:
        z, logits = self.model.features_and_logits(x)
        return gradnorm_from_features(z, logits)

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        ((z, logits),) = feats
        return gradnorm_from_features(z, logits)


class _Ensemble(Score):
    ensemble = True

    def mean_log_probs(self, logits: Sequence[Tensor]) -> Tensor:
        """log of the mean softmax over models: (N, K)."""
        lp = torch.stack([_log_softmax(g) for g in logits])  # (M, N, K)
        return torch.logsumexp(lp, 0) - torch.log(torch.tensor(float(len(logits)), dtype=lp.dtype))

    def __call__(self, x: Tensor) -> Tensor:
        return self.combine(self.mean_log_probs([m(x) for m in self.models]))

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        return self.combine(self.mean_log_probs([logits for _, logits in feats]))

    @abc.abstractmethod
    def combine(self, mean_logp: Tensor) -> Tensor: ...


@SCORES.register("ensemble_msp")
class EnsembleMSP(_Ensemble):
    """Deep ensemble: maximum of the mean softmax over the seeds of one configuration."""

    def combine(self, mean_logp: Tensor) -> Tensor:
        return mean_logp.exp().max(1).values


@SCORES.register("ensemble_entropy")
class EnsembleEntropy(_Ensemble):
    """Deep ensemble: negative entropy of the mean softmax."""

    def combine(self, mean_logp: Tensor) -> Tensor:
        return _neg_entropy(mean_logp)


@SCORES.register("energy")
class Energy(Score):
    """logsumexp_k g_k(x): minus the free energy at temperature 1 (Liu et al. 2020)."""

    def __call__(self, x: Tensor) -> Tensor:
        return torch.logsumexp(self.model(x).double(), dim=1)

    def from_features(self, feats: Sequence[tuple[Tensor, Tensor]]) -> Tensor:
        ((_, logits),) = feats
        return torch.logsumexp(logits.double(), dim=1)


@SCORES.register("rmd")
class RelativeMahalanobisScore(DensityScore):
    """Relative Mahalanobis distance (Ren et al. 2021), negated; see :class:`~densitune.search.ood.densities.baselines.RelativeMahalanobis`."""

    density_name = "rmd"


@SCORES.register("knn")
class KNNScore(DensityScore):
    """Deep kNN (Sun et al. 2022), negated distance; see :class:`~densitune.search.ood.densities.baselines.KNNScoreModel`."""

    density_name = "knn"


@SCORES.register("vim")
class ViMScore(DensityScore):
    """ViM (Wang et al. 2022), negated; needs ``model.head``; see :class:`~densitune.search.ood.densities.baselines.ViMModel`."""

    density_name = "vim"


def create_score(name: str, models: Sequence[FeatureModel], density: Density | None = None, **params: Any) -> Score:
    """Build the registered score ``name`` with its ``params`` (unknown names list the known ones)."""
    return score_class(name)(models, density, **params)


def score_class(name: str) -> type[Score]:
    """The class of score ``name``: a registered one, or an oriented variant (:data:`ORIENTED`)."""
    return _VARIANTS.get(name) or SCORES.get(name)
