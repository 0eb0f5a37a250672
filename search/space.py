"""The search space: which (model group, score, density, density parameters, ε) points exist.

Not every product point is meaningful: ``diff`` needs ε > 0, ensemble scores need a
group with at least two seeds, and scores without a density do not vary with one.
The grid sampler therefore runs over the list of valid points (each exactly once);
TPE uses a conditional define-by-run space over the same choices.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from densitune.errors import ConfigError
from densitune.search.models import ModelGroup
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.ood.scores import score_class
from densitune.search.spec import SearchSpec


@dataclass(frozen=True)
class TrialParams:
    """One point of the search space: model group, score, density with its parameters, ε.

    ``density`` is a :class:`DensitySpec` (``DensitySpec()``: a score without a density); a bare name is taken as
    that density with its default parameters (``TrialParams(g, "density", "kde", eps=0.01)``).
    """

    group: str  # ModelGroup.key
    score: str
    density: DensitySpec = field(default_factory=DensitySpec)
    eps: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.density, str):
            object.__setattr__(self, "density", DensitySpec(self.density))
        elif not isinstance(self.density, DensitySpec):
            raise ConfigError(f"a trial's density must be a DensitySpec or a name, got {self.density!r}")

    @property
    def label(self) -> str:
        """A readable, unique name of the point (Tune shows it in the trial table)."""
        dens = f"|{self.density.name}" if self.density.name else ""
        prm = "".join(f",{k}={v}" for k, v in self.density.params.items())
        return f"{self.group}|{self.score}{dens}{prm}|eps={self.eps:g}"


def _param_grid(spec: SearchSpec, name: str) -> list[dict[str, Any]]:
    """Every parameter combination ``spec.density_params`` asks for density (or fitted score model) ``name``."""
    grid = spec.density_params.get(name, {})
    keys = sorted(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def density_variants(spec: SearchSpec) -> list[DensitySpec]:
    """Every (density, parameters) combination the spec asks for."""
    return [DensitySpec(name, p) for name in spec.densities for p in _param_grid(spec, name)]


def methods(spec: SearchSpec) -> list[tuple[str, DensitySpec]]:
    """(score, density) for every score; density-free scores appear once (``DensitySpec()``); a score with its own
    fitted model (``density_name``: knn, rmd, vim) appears once per parameter combination of that model."""
    out = []
    for score in spec.scores:
        cls = score_class(score)
        if cls.density_name is not None:
            out += [(score, DensitySpec(cls.density_name, p)) for p in _param_grid(spec, cls.density_name)]
        elif cls.uses_density:
            out += [(score, d) for d in density_variants(spec)]
        else:
            out.append((score, DensitySpec()))
    return out


def eligible_groups(score: str, groups: list[ModelGroup]) -> list[ModelGroup]:
    """Groups a score can run on (ensembles need two or more seeds)."""
    if score_class(score).ensemble:
        return [g for g in groups if len(g.seeds) >= 2]
    return list(groups)


def check_groups(spec: SearchSpec, groups: list[ModelGroup]) -> None:
    if spec.protocol == "id-only" and len(groups) != 1:
        raise ConfigError(f"protocol id-only compares likelihoods within one network's feature space; "
                          f"select one model group (got {len(groups)}: use -D / --backbone / --loss)")
    for score in spec.scores:
        if not eligible_groups(score, groups):
            raise ConfigError(f"score {score!r} is an ensemble over seeds: train at least 2 seeds of a configuration (--seeds 0 1 2)")


def grid_points(spec: SearchSpec, groups: list[ModelGroup]) -> list[TrialParams]:
    """Every valid grid point, in a fixed order."""
    check_groups(spec, groups)
    points = []
    for score, density in methods(spec):
        cls = score_class(score)
        for g in eligible_groups(score, groups):
            for eps in spec.eps_grid:
                if cls.needs_ip and eps == 0:
                    continue
                points.append(TrialParams(g.key, score, density, float(eps)))
    if not points:
        raise ConfigError("the search grid is empty (diff needs an eps grid with values > 0)")
    return points


class DefineByRun:
    """Optuna define-by-run space for TPE: conditional, so no invalid point is drawn.

    A picklable class rather than a closure: Tune pickles the searcher with its
    experiment state (that is what makes resuming possible).
    """

    def __init__(self, spec: SearchSpec, groups: list[ModelGroup]) -> None:
        check_groups(spec, groups)
        self.scores = list(spec.scores)
        self.models = [g.key for g in groups]
        self.ensemble_models = [g.key for g in groups if len(g.seeds) >= 2]
        self.densities = list(spec.densities)
        own = [n for s in spec.scores if (n := score_class(s).density_name) is not None]
        self.density_params = {d: dict(spec.density_params.get(d, {})) for d in [*spec.densities, *own]}
        self.eps_range = spec.eps_range
        self.allow_ip = spec.protocol != "id-only"

    def __call__(self, trial) -> None:
        score = trial.suggest_categorical("score", self.scores)
        cls = score_class(score)
        if cls.ensemble:
            trial.suggest_categorical("ensemble_model", self.ensemble_models)
        else:
            trial.suggest_categorical("model", self.models)
        if cls.uses_density:
            density = cls.density_name or trial.suggest_categorical("density", self.densities)
            for key, values in sorted(self.density_params[density].items()):
                trial.suggest_categorical(f"{density}.{key}", list(values))
        if cls.needs_ip or (self.allow_ip and trial.suggest_categorical("ip", [False, True])):
            trial.suggest_float("eps", *self.eps_range, log=True)
        return None


def params_from_config(config: dict[str, Any]) -> TrialParams:
    """Decode the flat dict Optuna/Tune produced with :class:`DefineByRun`."""
    score = config["score"]
    model = config.get("ensemble_model") or config["model"]
    cls = score_class(score)
    density = (cls.density_name or config.get("density", "")) if cls.uses_density else ""
    prefix = f"{density}."
    params = {k[len(prefix):]: v for k, v in config.items() if density and k.startswith(prefix)}
    eps = float(config["eps"]) if "eps" in config else 0.0
    return TrialParams(model, score, DensitySpec(density, params), eps)
