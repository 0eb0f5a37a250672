"""Ray Tune + Optuna adapter for the search. All Tune / Optuna calls of the search live here.

The sampler is Optuna's, behind Tune's ``OptunaSearch``:

* ``grid``: a GridSampler over one categorical, the list of valid points
  (:func:`search.space.grid_points`), with ``num_samples`` exactly the grid size
  (more would re-run points, per PLATFORM.md), so each point runs once;
* ``tpe``: a TPESampler over the conditional define-by-run space
  (:class:`search.space.DefineByRun`), ε drawn from {0} ∪ log-uniform range.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search.evaluate import workspace
from search.models import ModelGroup
from search.space import DefineByRun, TrialParams, grid_points, params_from_config
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


def search_trainable(
    config: dict[str, Any], spec: SearchSpec, groups: dict[str, ModelGroup], points: dict[str, TrialParams], run: SearchRun
) -> None:
    """Tune function trainable: one trial = :func:`search.trial.run_trial` + a Parquet file + a report."""
    import torch
    from ray import tune

    from search.results import write_rows
    from search.trial import run_trial

    torch.set_num_threads(max(1, int(run.cpus_per_trial)))
    params = points[config["point"]] if "point" in config else params_from_config(config)
    trial_id = tune.get_context().get_trial_id()
    ws = workspace()
    objective, rows = run_trial(ws, spec, groups[params.group], params, trial_id)
    write_rows(run.results_dir, rows, name=trial_id)
    log.info("trial %s %s -> %s=%.4f (cache counts %s)", trial_id, params.label, spec.objective, objective, dict(ws.counts))
    tune.report({spec.objective: objective, "eps": params.eps, **{f"n_{k}": v for k, v in ws.counts.items()}})


def trial_budget(spec: SearchSpec, groups: list[ModelGroup]) -> int:
    if spec.sampler == "grid":
        return len(grid_points(spec, groups))
    return spec.num_samples or DEFAULT_TPE_TRIALS


def run_search(spec: SearchSpec, groups: list[ModelGroup], run: SearchRun, *, resume: bool = False, verbose: int = 1):
    """Run the search; returns Tune's ResultGrid. Rows land in ``run.results_dir``."""
    import optuna
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from trainables.ray_runtime import trial_resources

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    points = {p.label: p for p in grid_points(spec, groups)} if spec.sampler == "grid" else {}
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, spec=spec, groups={g.key: g for g in groups}, points=points, run=run),
        trial_resources(run.cpus_per_trial),
    )
    name = f"search-{spec.experiment}"
    path = str(Path(run.storage_path).resolve() / name)
    if resume and tune.Tuner.can_restore(path):
        log.info("resuming search experiment %s", path)
        return tune.Tuner.restore(path, trainable=trainable, resume_errored=True).fit()
    if spec.sampler == "grid":
        n = len(points)
        sampler = optuna.samplers.GridSampler({"point": list(points)}, seed=spec.seed)
        space: Any = {"point": optuna.distributions.CategoricalDistribution(list(points))}
    else:
        n = spec.num_samples or DEFAULT_TPE_TRIALS
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, min(10, n // 3)))
        space = DefineByRun(spec, groups)
    algo = OptunaSearch(space=space, metric=spec.objective, mode=spec.mode, sampler=sampler)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=algo, num_samples=n, reuse_actors=True, max_concurrent_trials=run.max_concurrent),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(Path(run.storage_path).resolve()),
            failure_config=tune.FailureConfig(max_failures=0),
            verbose=verbose,
        ),
    )
    log.info("search %s: %s sampler, %d trials over %d model group(s)", spec.experiment, spec.sampler, n, len(groups))
    return tuner.fit()
