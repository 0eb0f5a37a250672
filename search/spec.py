"""The search specification: what to search, on which models, judged on which data.

One frozen dataclass, validated when built, so a typo fails before Ray starts and
before anything is written. The CLI and (later) YAML files both build it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from densitune.errors import ConfigError

SAMPLERS = ("grid", "tpe")
#: How hyperparameters are selected (recorded in every row):
#: val-ood   ID validation vs a held-out validation OOD set distinct from the test sets (default);
#: adv-proxy ID validation vs FGSM-perturbed ID validation inputs (no OOD data needed);
#: id-only   held-out ID log-likelihood of the density (selects density parameters, ε = 0, one model group).
PROTOCOLS = ("val-ood", "adv-proxy", "id-only")
METRICS = {"auroc": "max", "auprc": "max", "fpr95": "min"}

#: The ε grid of Lee et al. (2018, Mahalanobis), extended upwards because the
#: embedded default's 8×8 digits need larger steps than CIFAR images.
DEFAULT_EPS_GRID = (0.0, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
#: TPE draws ε from {0} ∪ log-uniform[low, high].
DEFAULT_EPS_RANGE = (1e-4, 0.1)


def check_space(
    densities: tuple[str, ...],
    scores: tuple[str, ...],
    eps_grid: tuple[float, ...],
    eps_range: tuple[float, float],
    dims: tuple[int, ...],
) -> None:
    """Validate the search space alone (names, ε >= 0, D > 0): usable before any file is read."""
    from densitune.search.ood.densities import DENSITIES, FITTED_SCORES
    from densitune.search.ood.scores import SCORES

    for name in densities:
        if name in FITTED_SCORES:
            raise ConfigError(f"{name!r} is a score fitted on features, not a density: search it as a score "
                              f"(scores: [{name}]), its parameters under density_params.{name}")
        DENSITIES.check(name)
    for name in scores:
        SCORES.check(name)
    for eps in (*eps_grid, *eps_range):
        if not (isinstance(eps, (int, float)) and math.isfinite(eps)) or eps < 0:
            raise ConfigError(f"eps must be a finite number >= 0, got {eps}")
    lo, hi = eps_range
    if not 0 < lo < hi:
        raise ConfigError(f"eps range must satisfy 0 < low < high, got {lo}..{hi}")
    if not eps_grid:
        raise ConfigError("eps grid is empty")
    for d in dims:
        if int(d) <= 0:
            raise ConfigError(f"feature dimension D must be > 0, got {d}")


def check_density_params(density_params: Any) -> None:
    """``{density: {param: [values]}}``; every value is tried on the density (bad names or values fail)."""
    from densitune.search.ood.densities import DENSITIES, FITTED_SCORES, create_density

    if not isinstance(density_params, dict):
        raise ConfigError(f"density_params must map density names to {{param: [values]}}, got {density_params!r}")
    for name, params in density_params.items():
        if name not in FITTED_SCORES:  # knn, rmd, vim: the parameters of the scores of those names
            DENSITIES.check(name)  # a density that is not searched keeps its params unused
        if not isinstance(params, dict):
            raise ConfigError(f"density_params.{name} must map parameter names to lists of values, got {params!r}")
        for key, values in params.items():
            if not isinstance(values, (list, tuple)) or not values:
                raise ConfigError(f"density_params.{name}.{key} must be a non-empty list of values")
            for v in values:
                create_density(name, **{key: v})


@dataclass(frozen=True)
class SearchSpec:
    """A search over (model group, density, score, ε).

    * ``val_ood``: the OOD set used for selection (with ID validation data);
      ``test_ood``: OOD sets that are only reported, never used to select.
    * ``eps_grid`` is the grid sampler's ε values; the TPE sampler draws ε from
      {0} ∪ log-uniform[``eps_range``].
    """

    experiment: str
    val_ood: str | None
    test_ood: tuple[str, ...]
    protocol: str = "val-ood"
    proxy_attack: str = "fgsm"
    proxy_eps: float = 8 / 255
    densities: tuple[str, ...] = ("gmm_sum",)
    scores: tuple[str, ...] = ("density",)
    eps_grid: tuple[float, ...] = DEFAULT_EPS_GRID
    eps_range: tuple[float, float] = DEFAULT_EPS_RANGE
    dims: tuple[int, ...] = ()  # restrict to these D (empty: every trained D)
    backbones: tuple[str, ...] = ()  # restrict to these backbones (empty: all trained)
    losses: tuple[str, ...] = ()  # restrict to these losses (empty: all trained)
    sampler: str = "grid"
    num_samples: int | None = None  # TPE trial budget (grid: the grid size)
    seed: int = 0
    metric: str = "auroc"
    data_root: str | None = None
    eval_limit: int | None = None  # cap on each evaluation set (seeded subset)
    batch_size: int = 256
    #: per density, each parameter's values to search, e.g. {"kde": {"bandwidth": ["scott", 0.5]}}
    density_params: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    #: adversarial-example detection (note §1.9): attacks on the ID test set, reported like test OOD sets
    attacks: tuple[str, ...] = ()
    attack_eps: float = 8 / 255
    attack_steps: int = 10

    def __post_init__(self) -> None:
        check_space(self.densities, self.scores, self.eps_grid, self.eps_range, self.dims)
        from densitune.trainables.train.config import check_experiment_name

        check_experiment_name(self.experiment)
        check_density_params(self.density_params)
        if self.attacks:
            from densitune.search.ood.attacks import ATTACKS

            for a in self.attacks:
                ATTACKS.check(a)
            if not (self.attack_eps > 0 and math.isfinite(self.attack_eps)):
                raise ConfigError(f"attack eps must be > 0, got {self.attack_eps}")
            if self.attack_steps < 1:
                raise ConfigError(f"attack steps must be >= 1, got {self.attack_steps}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"unknown sampler {self.sampler!r}; known: {', '.join(SAMPLERS)}")
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; known: {', '.join(METRICS)}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"unknown protocol {self.protocol!r}; known: {', '.join(PROTOCOLS)}")
        if self.protocol == "val-ood" and not self.val_ood:
            raise ConfigError("protocol val-ood needs a validation OOD set (val_ood)")
        if self.protocol == "adv-proxy":
            from densitune.search.ood.attacks import ATTACKS

            ATTACKS.check(self.proxy_attack)
            if not (self.proxy_eps > 0 and math.isfinite(self.proxy_eps)):
                raise ConfigError(f"proxy_eps must be > 0, got {self.proxy_eps}")
            from densitune.search.ood.scores import SCORES

            ens = [s for s in self.scores if SCORES.get(s).ensemble]
            if ens:
                raise ConfigError(f"protocol adv-proxy attacks one model; it cannot select ensemble scores {ens}")
        if self.protocol == "id-only":
            # Held-out ID likelihood can rank density types and parameters of one network; it says
            # nothing about ε (ip raises every likelihood) nor across networks (different feature spaces).
            if tuple(self.scores) != ("density",):
                raise ConfigError("protocol id-only selects density parameters: scores must be [density]")
            if tuple(self.eps_grid) != (0.0,):
                raise ConfigError("protocol id-only cannot select eps (ip raises every likelihood): use eps_grid [0]")
        if not self.test_ood:
            raise ConfigError("at least one test OOD set is needed")
        if self.val_ood in self.test_ood:
            # The selection set must be distinct from every reported set (no test leakage).
            raise ConfigError(f"validation OOD set {self.val_ood!r} is also a test OOD set; choose a distinct one")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ConfigError(f"number of trials must be > 0, got {self.num_samples}")
        if self.eval_limit is not None and self.eval_limit <= 0:
            raise ConfigError(f"eval limit must be > 0, got {self.eval_limit}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-able dict (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SearchSpec:
        """Inverse of :meth:`to_dict`; unknown keys are an error that names them."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"unknown search spec key(s): {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        kw: dict[str, Any] = {k: tuple(v) if isinstance(v, list) and k != "density_params" else v for k, v in d.items()}
        return cls(**kw)

    @property
    def mode(self) -> str:
        return "max" if self.protocol == "id-only" else METRICS[self.metric]

    @property
    def objective(self) -> str:
        """Name of the reported metric the search optimises (validation data only)."""
        return "val_loglik" if self.protocol == "id-only" else f"val_{self.metric}"

    @property
    def protocol_label(self) -> str:
        """Recorded in every row: how hyperparameters were selected."""
        if self.protocol == "val-ood":
            return f"val-ood:{self.val_ood}"
        if self.protocol == "adv-proxy":
            return f"adv-proxy:{self.proxy_attack}@{self.proxy_eps:.4g}"
        return "id-only:val-loglik"
