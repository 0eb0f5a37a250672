"""Ray Tune + Optuna adapter of ``densitune tune``: search the network itself (D, loss, λ, backbone), training
each network on demand, scoring it on validation at each rung and stopping the weak ones early.

* The outer space is Optuna's TPE behind Tune's ``OptunaSearch``, conditional (:class:`NetworkSpace`):
  λ exists only for the center-loss variants, so two ce networks never differ by an unused λ.
* Each outer trial trains its network with the training code of ``densitune train``
  (:func:`densitune.trainables.train.tune.record_epoch`: the same rows, final model and per-epoch state, under
  the network's config-hash key), so a network already trained in the run is reused, not trained again.
* At each rung (ASHA's milestones: epochs 1, 3, 9, ... and the last) the network is scored on VALIDATION only
  (ID validation + the validation OOD sets, :func:`densitune.search.evaluate.selection_metrics`, the search's
  own scoring) over a small inner grid (:attr:`TuneRun.rung_grid`); the best inner point is what Tune's
  ASHA scheduler compares. No test split is ever loaded here.
* Rows (stage ``tune``): one per rung evaluation (``tune_status`` "rung") per inner point and validation OOD set,
  and one per outer trial (``stopped`` or ``finished``, the epochs reached, the GPU-seconds used).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import optuna
import torch

from densitune.errors import ConfigError, SearchError
from densitune.results.rows import provenance, result_row
from densitune.results.store import has_results, read_results, write_rows
from densitune.run.console import log_to_file
from densitune.run.failures import MAX_RETRIES, check_budget, fatal_stopper, guarded, raise_fatal
from densitune.run.ray_runtime import progress_callback, require_cuda_for_assigned_gpus, trial_resources, trial_slots
from densitune.run.runstore import RunPath, location, tune_storage
from densitune.run.storage import fatal_storage
from densitune.search.evaluate import aggregate_objective, selection_metrics, selection_sets, workspace
from densitune.search.models import ModelGroup
from densitune.search.optuna_study import _Replay
from densitune.search.space import DensitySpec, TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import density_columns
from densitune.search.tune import raise_failed_trials
from densitune.trainables.nets.losses import LOSSES
from densitune.trainables.train.checkpoint import save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit
from densitune.trainables.train.tune import TrainRun, is_trained, record_epoch, saved_state

log = logging.getLogger(__name__)

#: The loss that has no center term (so no λ); every other registered loss is a center-loss variant.
PLAIN_LOSS = "ce"


@dataclass(frozen=True)
class NetworkSpace:
    """Optuna define-by-run space of the networks (picklable: Tune pickles the searcher with its state).

    ``dims`` a list of D, or ``d_range`` (LO, HI): an integer on a log scale. ``lam_range`` (LO, HI): λ of the
    center-loss variants on a log scale; None: every center-loss network has ``base.lam``. A ce network always
    has ``base.lam`` (its hash then equals ``densitune train``'s for the same network)."""

    backbones: tuple[str, ...]
    losses: tuple[str, ...]
    dims: tuple[int, ...] = ()
    d_range: tuple[int, int] | None = None
    lam_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if bool(self.dims) == (self.d_range is not None):
            raise ConfigError("tune: give the feature dimension as -D D ... or as --D-range LO HI (one of them)")
        if self.d_range is not None and not (1 <= self.d_range[0] < self.d_range[1]):
            raise ConfigError(f"--D-range LO HI needs 1 <= LO < HI, got {self.d_range[0]} {self.d_range[1]}")
        if any(d < 1 for d in self.dims):
            raise ConfigError(f"-D values must be >= 1, got {list(self.dims)}")
        if self.lam_range is not None and not (0 < self.lam_range[0] < self.lam_range[1]):
            raise ConfigError(f"--lam-range LO HI needs 0 < LO < HI, got {self.lam_range[0]} {self.lam_range[1]}")
        if not self.losses or not self.backbones:
            raise ConfigError("tune: give at least one --loss and one --backbone")
        for loss in self.losses:
            LOSSES.check(loss)

    def __call__(self, trial: Any) -> None:
        trial.suggest_categorical("backbone", list(self.backbones))
        if self.d_range is not None:
            trial.suggest_int("D", self.d_range[0], self.d_range[1], log=True)
        else:
            trial.suggest_categorical("D", list(self.dims))
        loss = trial.suggest_categorical("loss", list(self.losses))
        if loss != PLAIN_LOSS and self.lam_range is not None:
            trial.suggest_float("lam", *self.lam_range, log=True)

    def network(self, base: TrainConfig, params: dict[str, Any]) -> TrainConfig:
        """The network of an outer trial's parameters (seed, epochs and the other settings from ``base``)."""
        lam = float(params["lam"]) if "lam" in params and params["loss"] != PLAIN_LOSS else base.lam
        return replace(base, backbone=params["backbone"], feature_dim=int(params["D"]), loss=params["loss"], lam=lam)


def rungs(epochs: int, grace: int = 1, reduction: int = 3) -> tuple[int, ...]:
    """The epochs at which a network is scored: ASHA's milestones ``grace · reduction^k`` below ``epochs``, and
    ``epochs`` itself (the scheduler decides at each milestone; the last epoch is where a survivor ends)."""
    out, r = [], grace
    while r < epochs:
        out.append(r)
        r *= reduction
    return (*out, epochs)


@dataclass(frozen=True)
class TuneRun:
    """Where an outer search writes and what each outer trial does."""

    experiment: str
    train: TrainRun  # the networks: RUN/models/<experiment>/<key>, their epoch rows and per-epoch state
    space: NetworkSpace
    base: TrainConfig  # every setting of a network the space does not choose
    spec: SearchSpec  # the rung evaluation: validation sets, metric, aggregation (test sets never read)
    rung_grid: tuple[tuple[str, float], ...]  # (density, ε) inner points
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None

    @property
    def results_dir(self) -> str:
        return self.train.results_dir

    def rung_dir(self, config: TrainConfig, epoch: int) -> RunPath:
        """The weights of ``config`` after ``epoch`` (one folder per rung: scored once, never overwritten)."""
        return location(self.train.storage_path) / "rungs" / self.experiment / config.key / f"e{epoch:04d}"


def _group(config: TrainConfig, checkpoint: str) -> ModelGroup:
    return ModelGroup(key=config.name, backbone=config.backbone, D=config.D, loss=config.loss, lam=config.lam,
                      spectral=config.spectral, dataset=config.dataset, data_seed=config.data_seed, seeds=(config.seed,),
                      checkpoints=(checkpoint,))


def rung_objective(run: TuneRun, config: TrainConfig, checkpoint: str, epoch: int, trial_id: str,
                   started: datetime) -> tuple[float, list[dict[str, Any]]]:
    """Score the network at ``checkpoint`` (``config`` after ``epoch`` epochs) over the inner grid, on validation
    only; returns (the best inner point's objective, the rows: one per inner point and validation set)."""
    spec, group = run.spec, _group(config, checkpoint)
    ws = workspace(None, True)
    best: float | None = None
    rows: list[dict[str, Any]] = []
    for density, eps in run.rung_grid:
        params = TrialParams(group.key, "density", DensitySpec(density), float(eps))
        t0 = time.perf_counter()
        vals = [selection_metrics(ws, spec, [checkpoint], params, ood) for ood in selection_sets(spec)]
        objective = aggregate_objective(spec, [[v.pop("objective")] for v in vals])
        if best is None or (objective < best if spec.mode == "min" else objective > best):
            best = objective
        point = {"network": config.key, "rung": epoch, "point": params.label}
        for v in vals:
            ood = v.pop("ood_dataset")
            where = provenance(ws.device, data_checksums=v.pop("data_checksums"))
            rows.append(result_row(
                experiment=run.experiment, trial_id=trial_id, stage="tune", protocol=spec.protocol_label,
                network=group, started_at=started, provenance=where, seed=config.seed, epoch=epoch,
                checkpoints=[checkpoint], ood_dataset=ood, split="val", score=params.score, eps=params.eps,
                ensemble=False, search_params=json.dumps(point, sort_keys=True), objective=objective,
                duration_s=time.perf_counter() - t0, tune_status="rung", **density_columns(params), **v))
    assert best is not None  # the rung grid is never empty (checked by the service)
    return best, rows


def tune_trainable(config: dict[str, Any], run: TuneRun, claims: Any = None) -> None:
    """Tune function trainable: train one network epoch by epoch (or reuse it), report the rung objective.

    ``claims`` (a :class:`_NetworkClaims` actor): a network that two running trials drew is trained by one of
    them; the other waits, then reuses it, or continues it from its last saved epoch (a stopped trial's)."""
    import ray
    from ray import tune

    log_to_file(run.train.log_file)
    require_cuda_for_assigned_gpus()
    torch.set_num_threads(max(1, int(run.cpus_per_trial)))
    cfg = run.space.network(run.base, config)
    trial_id = tune.get_context().get_trial_id()
    gpus = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    started, t0 = datetime.now(UTC), time.perf_counter()
    while claims is not None and not ray.get(claims.claim.remote(cfg.key, trial_id)):
        time.sleep(1.0)
    reused = is_trained(run.train, cfg)

    def report(epoch: int, checkpoint: str) -> None:
        objective, rows = rung_objective(run, cfg, checkpoint, epoch, trial_id, started)
        with fatal_storage(run.results_dir):
            write_rows(run.results_dir, rows, name=f"{trial_id}-e{epoch:04d}")
        log.info("tune %s %s epoch %d: %s=%.4f", trial_id, cfg.key, epoch, run.spec.objective, objective)
        if claims is not None:  # the scheduler may stop the trial at this report: let the network go first
            ray.get(claims.release.remote(cfg.key, trial_id))
        tune.report({run.spec.objective: objective, "epoch": epoch, "network": cfg.key,
                     "gpu_seconds": gpus * (time.perf_counter() - t0), "reused": reused})
        if claims is not None and epoch < cfg.epochs:  # it goes on: hold the network again
            while not ray.get(claims.claim.remote(cfg.key, trial_id)):
                time.sleep(1.0)

    if reused:  # trained before (by train, or an earlier trial): scored once, at its last epoch
        log.info("tune %s: %s is trained already; reusing it", trial_id, cfg.key)
        report(cfg.epochs, str(run.train.model_dir(cfg)))
        return
    milestones = set(rungs(cfg.epochs))
    for st in fit(cfg, resume=saved_state(replace(run.train, resume=True), cfg), compile=run.train.compile):
        args = record_epoch(run.train, cfg, st, started, t0)
        if st.epoch in milestones:
            final = st.epoch == cfg.epochs
            checkpoint = run.train.model_dir(cfg) if final else save_checkpoint(run.rung_dir(cfg, st.epoch), **args)
            report(st.epoch, str(checkpoint))


class _NetworkClaims:
    """Which running trial trains which network: a Ray actor the driver starts for one tune (:func:`run_tune`),
    so that a network two running trials drew is trained by one of them (:func:`tune_trainable`)."""

    def __init__(self) -> None:
        self.holders: dict[str, str] = {}

    def claim(self, key: str, trial_id: str) -> bool:
        return self.holders.setdefault(key, trial_id) == trial_id

    def release(self, key: str, trial_id: str) -> None:
        if self.holders.get(key) == trial_id:
            del self.holders[key]


def trial_row(run: TuneRun, trial_id: str, params: dict[str, Any], metrics: dict[str, Any]) -> dict[str, Any]:
    """The row of one outer trial: its network, the epochs it reached, stopped or finished, its GPU-seconds."""
    cfg = run.space.network(run.base, params)
    epoch = int(metrics.get("epoch") or 0)
    objective = metrics.get(run.spec.objective)
    return result_row(
        experiment=run.experiment, trial_id=trial_id, stage="tune", protocol=run.spec.protocol_label,
        network=_group(cfg, str(run.train.model_dir(cfg))), started_at=datetime.now(UTC), provenance=provenance("cpu"),
        seed=cfg.seed, epoch=epoch, objective=None if objective is None else float(objective),
        checkpoints=[str(run.train.model_dir(cfg))] if epoch == cfg.epochs else None,
        search_params=json.dumps({**params, "network": cfg.key, "reused": bool(metrics.get("reused"))}, sort_keys=True),
        tune_status="finished" if epoch == cfg.epochs else "stopped", gpu_seconds=float(metrics.get("gpu_seconds") or 0.0))


def record_callback(run: TuneRun) -> Any:
    """A Tune callback that writes an outer trial's row when the trial completes: it finished its epochs, or the
    scheduler stopped it (Tune calls ``on_trial_complete`` for both). A trial that a budget (``--time-budget``,
    ``--max-gpu-hours``) or Ctrl-C cut short gets no row: ``--resume`` runs it again, from its saved epoch."""
    from ray.tune import Callback

    class _Record(Callback):
        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            metrics = dict(trial.last_result or {})
            if not metrics.get("epoch"):
                return
            row = trial_row(run, trial.trial_id, dict(trial.config), metrics)
            with fatal_storage(run.results_dir):  # one file per outer trial: a resumed run never rewrites one
                write_rows(run.results_dir, [row], name=f"{trial.trial_id}-trial")

    return _Record()


def finished_trials(results_dir: str, experiment: str) -> list[dict[str, Any]]:
    """The outer-trial rows (stopped or finished) already in the results, oldest first."""
    if not has_results(results_dir, experiment):
        return []
    table = read_results(results_dir, experiment=experiment, stage="tune")
    rows = [r for r in table.to_pylist() if r["tune_status"] in ("stopped", "finished")]
    return sorted(rows, key=lambda r: r["started_at"])


class _ReplayNetwork(_Replay):
    """:class:`densitune.search.optuna_study._Replay` with the integer D of ``--D-range``."""

    def suggest_int(self, name: str, low: int, high: int, *, log: bool = False) -> int:
        self.distributions[name] = optuna.distributions.IntDistribution(low, high, log=log)
        return int(self.params[name])


def warm_storage(run: TuneRun, done: list[dict[str, Any]]) -> optuna.storages.InMemoryStorage:
    """An Optuna storage holding the outer trials already run, so that TPE continues informed on ``--resume``."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="minimize" if run.spec.mode == "min" else "maximize")
    for r in done:
        if r["objective"] is None:
            continue
        params = json.loads(r["search_params"])
        replay = _ReplayNetwork(params)
        run.space(replay)
        study.add_trial(optuna.trial.create_trial(params={k: params[k] for k in replay.distributions},
                                                  distributions=replay.distributions, value=r["objective"]))
    return storage


def run_tune(run: TuneRun, *, num_networks: int, resume: bool = False, seed: int = 0, time_budget_s: float | None = None,
             max_gpu_hours: float | None = None, verbose: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """Run the outer search; returns every outer-trial row of the experiment (those of earlier runs included).

    ``num_networks`` outer trials in all (with ``resume``, those already recorded count). The ASHA scheduler
    (Tune's ``AsyncHyperBandScheduler``) stops weak networks at its milestones (:func:`rungs`).

    Raises:
        DensituneError: a trial failed fatally, ``max_gpu_hours`` or ``time_budget_s`` stopped the run
            before ``num_networks`` trials ended (resumable), or trials failed.
    """
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    done = finished_trials(run.results_dir, run.experiment) if resume else []
    todo = max(num_networks - len(done), 0)
    if done:
        log.info("resuming tune %s: %d network trial(s) recorded, %d to run", run.experiment, len(done), todo)
    if todo:
        resources = trial_resources(run.cpus_per_trial, run.gpus_per_trial)
        stopper = fatal_stopper(resources.get("gpu", 0.0), max_gpu_hours)
        algo = OptunaSearch(space=run.space, metric=run.spec.objective, mode=run.spec.mode,
                            sampler=optuna.samplers.TPESampler(seed=seed + len(done), n_startup_trials=max(2, min(10, num_networks // 3))),
                            storage=warm_storage(run, done) if done else None)
        scheduler = ASHAScheduler(time_attr="epoch", max_t=run.base.epochs, grace_period=1, reduction_factor=3)
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(guarded(tune_trainable, run.spec.objective), run=run,
                                                     claims=ray.remote(_NetworkClaims).options(num_cpus=0).remote()),
                                resources),
            tune_config=tune.TuneConfig(search_alg=algo, scheduler=scheduler, num_samples=todo, metric=run.spec.objective,
                                        mode=run.spec.mode, max_concurrent_trials=trial_slots(resources),
                                        time_budget_s=time_budget_s, reuse_actors=False),
            run_config=tune.RunConfig(
                name=f"tune-{run.experiment}", **tune_storage(run.train.storage_path),
                failure_config=tune.FailureConfig(max_failures=MAX_RETRIES),
                callbacks=[progress_callback(todo, run.spec.objective, run.spec.mode, what="tune", show=progress),
                           record_callback(run)],
                stop=stopper, verbose=verbose),
        )
        grid = tuner.fit()
        raise_fatal(grid, "tune", "network")
        check_budget(stopper, max_gpu_hours, "tune")
        raise_failed_trials(grid, "tune")
    every = finished_trials(run.results_dir, run.experiment)
    if len(every) < num_networks:
        why = f"the time budget ({time_budget_s:g} s)" if time_budget_s is not None else "the run"
        raise SearchError(f"{why} stopped the tune after {len(every)} of {num_networks} network trial(s)")
    return every


def ranked(rows: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    """Outer-trial rows best first: finished networks (their last-epoch objective) before stopped ones."""
    sign = 1.0 if mode == "min" else -1.0
    return sorted(rows, key=lambda r: (r["tune_status"] != "finished",
                                       sign * r["objective"] if r["objective"] is not None else math.inf))
