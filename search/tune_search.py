"""Ray Tune + Optuna adapter for the search. All Tune / Optuna calls of the search live here.

The sampler is Optuna's (GridSampler or TPESampler) behind Tune's ``OptunaSearch``;
the space is define-by-run so that ε is conditional in TPE: {0} ∪ log-uniform range.
Per PLATFORM.md, the grid run's ``num_samples`` is exactly the grid size (more would
re-run points).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.evaluate import TrialParams, workspace
from search.models import ModelGroup
from search.spec import SearchSpec

log = logging.getLogger(__name__)

DEFAULT_TPE_TRIALS = 20


@dataclass(frozen=True)
class SearchRun:
    """Where a search writes and how much each trial gets."""

    results_dir: str
    storage_path: str
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None


def grid_space(spec: SearchSpec, groups: list[ModelGroup]) -> dict[str, list[Any]]:
    """The grid of the grid sampler: model group x density x score x ε."""
    return {
        "model": [g.key for g in groups],
        "density": list(spec.densities),
        "score": list(spec.scores),
        "eps": [float(e) for e in spec.eps_grid],
    }


class DefineByRun:
    """Optuna define-by-run space; with TPE, ε is 0 ("no ip") or drawn log-uniformly.

    A picklable class rather than a closure: Tune pickles the searcher with its
    experiment state (that is what makes ``--resume`` possible).
    """

    def __init__(self, spec: SearchSpec, groups: list[ModelGroup]) -> None:
        self.grid = grid_space(spec, groups)
        self.sampler = spec.sampler
        self.eps_range = spec.eps_range

    def __call__(self, trial) -> None:
        if self.sampler == "grid":
            for k, values in self.grid.items():
                trial.suggest_categorical(k, values)
            return None
        for k in ("model", "density", "score"):
            trial.suggest_categorical(k, self.grid[k])
        if trial.suggest_categorical("ip", [False, True]):
            trial.suggest_float("eps", *self.eps_range, log=True)
        return None


def params_of(config: dict[str, Any]) -> TrialParams:
    """Trial params from the flat dict Tune passes (no "eps" key means ε = 0)."""
    eps = float(config.get("eps", 0.0)) if config.get("ip", True) else 0.0
    return TrialParams(group=config["model"], density=config["density"], score=config["score"], eps=eps)


def search_trainable(config: dict[str, Any], spec: SearchSpec, groups: dict[str, ModelGroup], run: SearchRun) -> None:
    """Tune function trainable: one trial = :func:`search.trial.run_trial` + a Parquet file + a report."""
    import torch
    from ray import tune

    from search.results import write_rows
    from search.trial import run_trial

    torch.set_num_threads(max(1, int(run.cpus_per_trial)))
    params = params_of(config)
    trial_id = tune.get_context().get_trial_id()
    ws = workspace()
    objective, rows = run_trial(ws, spec, groups[params.group], params, trial_id)
    write_rows(run.results_dir, rows, name=trial_id)
    log.info("trial %s %s -> %s=%.4f (cache counts %s)", trial_id, params, spec.objective, objective, dict(ws.counts))
    tune.report({spec.objective: objective, "eps": params.eps, **{f"n_{k}": v for k, v in ws.counts.items()}})


def trial_budget(spec: SearchSpec, groups: list[ModelGroup]) -> int:
    if spec.sampler == "grid":
        return math.prod(len(v) for v in grid_space(spec, groups).values())
    return spec.num_samples or DEFAULT_TPE_TRIALS


def run_search(spec: SearchSpec, groups: list[ModelGroup], run: SearchRun, *, resume: bool = False, verbose: int = 1):
    """Run the search; returns Tune's ResultGrid. Rows land in ``run.results_dir``."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from trainables.ray_runtime import trial_resources

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    by_key = {g.key: g for g in groups}
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, spec=spec, groups=by_key, run=run),
        trial_resources(run.cpus_per_trial),
    )
    name = f"search-{spec.experiment}"
    path = str(Path(run.storage_path).resolve() / name)
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming search experiment %s", path)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_errored=True)
        return tuner.fit()
    n = trial_budget(spec, groups)
    if spec.sampler == "grid":
        sampler = optuna.samplers.GridSampler(grid_space(spec, groups), seed=spec.seed)
    else:
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, min(10, n // 3)))
    algo = OptunaSearch(
        space=DefineByRun(spec, groups), metric=spec.objective, mode=spec.mode, sampler=sampler
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=algo,
            num_samples=n,
            reuse_actors=True,
            max_concurrent_trials=run.max_concurrent,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(run.storage_path).resolve()),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
        ),
    )
    log.info("search %s: %s sampler, %d trials over %d model group(s)", spec.experiment, spec.sampler, n, len(groups))
    return tuner.fit()
