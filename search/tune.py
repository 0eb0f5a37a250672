"""Ray Tune + Optuna adapter for the search. All Tune / Optuna calls of the search live here.

The sampler is Optuna's, behind Tune's ``OptunaSearch``:

* ``grid``: a GridSampler over one categorical, the list of valid points
  (:func:`densitune.search.space.grid_points`), with ``num_samples`` exactly the grid size
  (more would make the sampler re-run points), so each point runs once;
* ``tpe``: a TPESampler over the conditional define-by-run space
  (:class:`densitune.search.space.DefineByRun`), ε drawn from {0} ∪ log-uniform range.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import optuna
import torch

from densitune.checks import error_summary
from densitune.errors import SearchError
from densitune.results.sample_scores import write_sample_scores
from densitune.results.store import COMPACT_EVERY, RollingCompaction, has_results, read_results, write_rows
from densitune.run.console import log_to_file
from densitune.run.failures import MAX_RETRIES, check_budget, fatal_stopper, guarded, raise_fatal
from densitune.run.ray_runtime import (
    compaction_callback,
    progress_callback,
    require_cuda_for_assigned_gpus,
    trial_resources,
    trial_slots,
)
from densitune.run.runlock import Fence, HeldLock
from densitune.run.runstore import tune_storage
from densitune.run.storage import fatal_storage
from densitune.search.evaluate import workspace
from densitune.search.models import ModelGroup
from densitune.search.optuna_study import StudyMirror, _Replay, journal_path, mirror_callback
from densitune.search.space import DefineByRun, TrialParams, grid_points, params_from_config
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.search.workspace import ip_cache_default

log = logging.getLogger(__name__)

DEFAULT_TPE_TRIALS = 20


@dataclass(frozen=True)
class SearchRun:
    """Where a search writes and how much each trial gets."""

    results_dir: str
    storage_path: str
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 when this (local) machine has a GPU, else 0
    max_concurrent: int | None = None
    cache_dir: str | None = None  # shared disk cache of features / densities / attacks
    log_file: str | None = None  # per-trial lines of every worker (densitune.run.console.log_to_file)
    compact_every: int = COMPACT_EVERY  # the driver merges finished trials' files in groups of this many (0: off)
    # the gradient-sign cache of ε > 0 trials, decided here on the driver (default: DENSITUNE_IP_CACHE, on) and
    # handed to each trial with the run, so a worker on any node follows it whatever its own environment says
    ip_cache: bool = field(default_factory=ip_cache_default)
    # the driver's writer lock, which each trial checks is still its driver's before it publishes rows
    fence: Fence | None = None


def search_trainable(
    config: dict[str, Any], spec: SearchSpec, groups: dict[str, ModelGroup], points: dict[str, TrialParams], run: SearchRun
) -> None:
    """Tune function trainable: one trial = :func:`densitune.search.trial.run_trial` + a Parquet file + a report."""
    from ray import tune

    log_to_file(run.log_file)
    require_cuda_for_assigned_gpus()  # given a GPU: CUDA or one fatal line, never the CPU silently
    torch.set_num_threads(max(1, int(run.cpus_per_trial)))
    params = points[config["point"]] if "point" in config else params_from_config(config)
    trial_id = tune.get_context().get_trial_id()
    ws = workspace(run.cache_dir, run.ip_cache)
    kept: dict | None = {} if spec.keep_scores == "all" else None  # per-sample test scores (densitune compare)
    objective, rows = run_trial(ws, spec, groups[params.group], params, trial_id, search_params=dict(config),
                                sample_scores=kept)
    name = trial_file_name(config, points, trial_id)
    with fatal_storage(run.results_dir):  # a failed write is fatal: it stops the whole run (densitune.run.failures)
        if run.fence is not None:  # never publish for a driver that lost its lock (densitune.run.runlock)
            run.fence.check()
        if kept is not None:  # before the rows: a trial with rows always has its scores
            write_sample_scores(run.results_dir, spec.experiment, name, trial_id, kept)
        write_rows(run.results_dir, rows, name=name)
    log.info("trial %s %s -> %s=%.4f (cache counts %s)", trial_id, params.label, spec.objective, objective, dict(ws.counts))
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    tune.report({spec.objective: objective, "eps": params.eps, "assigned_gpus": assigned.get("GPU", 0.0),
                 **{f"n_{k}": v for k, v in ws.counts.items()}})


def point_file_name(params: TrialParams) -> str:
    return "p-" + hashlib.sha1(params.label.encode()).hexdigest()[:16]


def trial_file_name(config: dict[str, Any], points: dict[str, TrialParams], trial_id: str) -> str:
    """The name a trial's rows are written under: a grid point's is the point's, so a point run again after a
    crash replaces its file; a TPE trial's is its Tune trial id."""
    return point_file_name(points[config["point"]]) if "point" in config else trial_id


def trial_budget(spec: SearchSpec, groups: list[ModelGroup]) -> int:
    if spec.sampler == "grid":
        return len(grid_points(spec, groups))
    return spec.num_samples or DEFAULT_TPE_TRIALS


def completed_trials(results_dir: str, experiment: str) -> dict[str, tuple[dict[str, Any], float]]:
    """trial_id -> (sampler parameters, objective) of every trial already in the results."""
    if not has_results(results_dir, experiment):
        return {}
    table = read_results(results_dir, experiment=experiment, stage="search")
    out = {}
    for tid, params, obj in zip(*(table.column(c).to_pylist() for c in ("trial_id", "search_params", "objective"))):
        loaded = json.loads(params)
        if "variant_of" not in loaded:  # an oriented variant (--orient validation) rides on its trial: no trial itself
            out[tid] = (loaded, obj)
    return out


def warm_storage(spec: SearchSpec, space: DefineByRun, done: list[tuple[dict[str, Any], float]]):
    """An in-memory Optuna storage holding the finished trials, so TPE resumes informed."""

    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="optuna", direction="minimize" if spec.mode == "min" else "maximize")
    for params, value in done:
        replay = _Replay(params)
        space(replay)
        study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in replay.distributions},
                                                  distributions=replay.distributions, value=value))
    return storage


def run_search(spec: SearchSpec, groups: list[ModelGroup], run: SearchRun, *, resume: bool = False, verbose: int = 0,
               max_gpu_hours: float | None = None, progress: bool = True, lease: HeldLock | None = None):
    """Run the search; returns Tune's ResultGrid (None when nothing was left to run).

    Rows land in ``run.results_dir``. With ``resume``, the trials already in the results
    (the Parquet files are the record) are not run again: a grid runs its missing points,
    TPE runs the rest of its budget with the finished trials given to the sampler.
    A trial lost with its node is run again from scratch (:mod:`densitune.run.failures`); a
    fatal error, or reaching ``max_gpu_hours``, stops the whole search (resumable).
    ``lease``: the writer lock the driver holds; its fence is checked before the driver publishes an Optuna
    record or a merged result file (each trial checks ``run.fence`` before its rows).
    ``progress`` shows a live progress bar on stderr. Ctrl-C raises KeyboardInterrupt here;
    the finished trials are in the results and ``resume`` runs the rest.

    Raises:
        DensituneError: a trial failed fatally, or ``max_gpu_hours`` was reached.
        SearchError: a trial still failed after its retries (the trials finished before it stay in
            the results); the one-line message counts the failures and gives the last line of the first one.
    """
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = completed_trials(run.results_dir, spec.experiment) if resume else {}
    points = {p.label: p for p in grid_points(spec, groups)} if spec.sampler == "grid" else {}
    storage = None
    if spec.sampler == "grid":
        finished = {p.get("point") for p, _ in done.values()}
        todo: list[str] | list[int] = [label for label in points if label not in finished]
        total = len(points)
        sampler: optuna.samplers.BaseSampler = optuna.samplers.GridSampler({"point": todo}, seed=spec.seed)
        space: Any = {"point": optuna.distributions.CategoricalDistribution(todo)} if todo else None
    else:
        total = trial_budget(spec, groups)
        todo = list(range(max(total - len(done), 0)))
        space = DefineByRun(spec, groups)
        sampler = optuna.samplers.TPESampler(seed=spec.seed, n_startup_trials=max(2, min(10, total // 3)))
        if done:
            storage = warm_storage(spec, space, list(done.values()))
    if done:
        log.info("resuming search %s: %d trial(s) already in the results, %d to run", spec.experiment, len(done), len(todo))
    fence = lease.check if lease is not None else None
    mirror = StudyMirror(journal_path(run.results_dir, spec.experiment), spec, groups, points, fence=fence)  # optuna.load_study
    mirror.sync(done)
    if not todo:
        return None

    def fenced_files(trial: Any) -> list[str]:
        """A finished trial's file, for merging: only while the driver holds the lock."""
        if fence is not None:
            fence()
        return [trial_file_name(trial.config, points, trial.trial_id)]
    resources = trial_resources(run.cpus_per_trial, run.gpus_per_trial)
    trainable = tune.with_resources(
        tune.with_parameters(guarded(search_trainable, spec.objective), spec=spec, groups={g.key: g for g in groups},
                             points=points, run=run),
        resources,
    )
    stopper = fatal_stopper(resources.get("gpu", 0.0), max_gpu_hours)
    concurrent = run.max_concurrent or trial_slots(resources)
    algo = OptunaSearch(space=space, metric=spec.objective, mode=spec.mode, sampler=sampler, storage=storage)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=algo, num_samples=len(todo), reuse_actors=True, max_concurrent_trials=concurrent),
        run_config=tune.RunConfig(
            name=f"search-{spec.experiment}",
            **tune_storage(run.storage_path),
            failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
            callbacks=[progress_callback(len(todo), spec.objective, spec.mode, what="search", show=progress),
                       mirror_callback(mirror),
                       compaction_callback(RollingCompaction(run.results_dir, spec.experiment, run.compact_every),
                                           fenced_files)],
            stop=stopper,
            verbose=verbose,
        ),
    )
    log.info("search %s: %s sampler, %d trials over %d model group(s)", spec.experiment, spec.sampler, len(todo), len(groups))
    grid = tuner.fit()
    raise_fatal(grid, "search", "point")
    check_budget(stopper, max_gpu_hours, "search")
    raise_failed_trials(grid, "search")
    return grid


def raise_failed_trials(grid: Any, what: str) -> None:
    """:class:`SearchError` counting the failed trials of Tune's ResultGrid ``grid`` (after their retries) and
    giving the last line of the first failure; nothing when none failed."""
    errors = [e for i in range(len(grid)) if (e := grid[i].error) is not None]
    if errors:
        raise SearchError(f"{len(errors)} {what} trial(s) failed; first: {error_summary(errors[0], last=True)}")
