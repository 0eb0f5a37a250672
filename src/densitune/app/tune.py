"""The tune service: ``tune(TuneOptions) -> TuneOutcome`` (``densitune tune``, ``densitune.tune(...)``).

Searches the network itself: D, the loss, λ of the center-loss variants and the backbone, with Optuna's TPE
through Ray Tune and Tune's ASHA scheduler on training epochs (:mod:`densitune.search.ondemand`). Each outer
trial trains its network on demand into ``RUN/models/<experiment>`` (a network already trained there is
reused) and is scored on validation only at each rung. Then the winning network config is trained on
``final_seeds`` seeds, and the top ``keep`` networks get the full search as an experiment of their own
(``<experiment>-final``, :mod:`densitune.app.search`). The flags, the space and the data are checked before
Ray starts and before anything is written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from densitune.app import session
from densitune.app.search import SearchOptions, SearchOutcome, search
from densitune.app.session import Outcome, RunOptions
from densitune.app.train import TrainGrid
from densitune.errors import ConfigError, DensituneError
from densitune.run.console import log_to_file
from densitune.run.resource_flags import check_resource_flags
from densitune.run.runlock import LockLost, writer_lease
from densitune.run.runstore import location

if TYPE_CHECKING:
    from densitune.search.ondemand import TuneRun


@dataclass(frozen=True, kw_only=True)
class TuneOptions(RunOptions):
    """What to tune: the network space, the training settings every network shares, the rung evaluation, the
    budget and the finish."""

    #: the networks' choices (backbones, dims: -D, losses) and the settings they share (dataset, λ without a
    #: lam_range, epochs, lr, ...); its ``experiment`` names the tune (``seeds`` is not read: see final_seeds)
    networks: TrainGrid = field(default_factory=lambda: TrainGrid(dims=()))
    d_range: tuple[int, int] | None = None  # --D-range LO HI (integer, log scale), instead of networks.dims
    lam_range: tuple[float, float] | None = None  # --lam-range LO HI (log scale), center-loss variants only
    compile: str = "auto"
    num_networks: int = 8
    rung_grid: tuple[tuple[str, float], ...] = (("gmm_sum", 0.0),)  # (density, ε) points scored at each rung
    val_ood: tuple[str, ...] | None = None  # None: the ID set's default validation OOD sets
    test_ood: tuple[str, ...] | None = None  # the final search's test sets (None: the ID set's default)
    val_agg: str = "mean"
    metric: str = "auroc"
    eval_limit: int | None = None
    seed: int = 0  # the TPE sampler's seed
    time_budget: float | None = None  # seconds for the outer search (resumable)
    keep: int = 1  # the top networks given the full search (0: none)
    final_seeds: int = 1  # the winning network config trained on this many seeds (0, 1, ...)
    search_values: Mapping[str, Any] = field(default_factory=dict)  # the final search's spec values (densities, ...)


@dataclass(frozen=True)
class TuneOutcome(Outcome):
    experiment: str = ""
    trials: tuple[dict[str, Any], ...] = ()  # the outer-trial rows, best first
    final: SearchOutcome | None = None  # the full search of the top ``keep`` networks

    @property
    def summary(self) -> str:
        stopped = sum(r["tune_status"] == "stopped" for r in self.trials)
        lines = [f"\ntune {self.experiment}: {len(self.trials)} network(s), {stopped} stopped early by the scheduler"]
        lines += [f"  {r['tune_status']:8s} {json.loads(r['search_params'])['network']}  epochs {r['epoch']}  "
                  f"objective {r['objective']:.4f}" for r in self.trials[:5] if r["objective"] is not None]
        return "\n".join(lines) + (self.final.summary if self.final is not None else "")


def _check(options: TuneOptions) -> tuple[Any, Any, Any]:
    """(space, base config, rung spec), every name and value checked; nothing is read or written."""
    from densitune.search.ondemand import NetworkSpace
    from densitune.search.ood.densities import DENSITIES
    from densitune.search.prepare import build_spec
    from densitune.trainables.train.config import TrainConfig

    if options.num_networks < 1:
        raise ConfigError(f"--num-networks must be >= 1, got {options.num_networks}")
    if options.keep < 0 or options.final_seeds < 0:
        raise ConfigError("--keep and --final-seeds must be >= 0")
    if options.time_budget is not None and not options.time_budget > 0:
        raise ConfigError(f"--time-budget must be > 0 seconds, got {options.time_budget}")
    if not options.rung_grid:
        raise ConfigError("--rung-grid needs at least one DENSITY:EPS point")
    for density, eps in options.rung_grid:
        DENSITIES.check(density)
        if not eps >= 0:
            raise ConfigError(f"--rung-grid: ε must be >= 0, got {eps}")
    space = NetworkSpace(backbones=tuple(options.networks.backbones), losses=tuple(options.networks.losses), dims=tuple(options.networks.dims),
                         d_range=options.d_range, lam_range=options.lam_range)
    net = options.networks
    base = TrainConfig(backbone=net.backbones[0], feature_dim=(net.dims or (options.d_range or (1,)))[0],
                       loss=net.losses[0], lam=net.lam, seed=0, epochs=net.epochs, lr=net.lr, batch_size=net.batch_size,
                       spectral=net.spectral, sn_coeff=net.sn_coeff, dataset=net.dataset, data_root=net.data_root,
                       train_limit=net.train_limit, experiment=net.experiment)
    for b in options.networks.backbones:  # every backbone name checked now, not in a trial
        replace(base, backbone=b)
    values: dict[str, Any] = {"experiment": options.networks.experiment, "val_agg": options.val_agg, "metric": options.metric,
                              "data_root": options.networks.data_root, "eval_limit": options.eval_limit,
                              "densities": tuple(dict.fromkeys(d for d, _ in options.rung_grid))}
    for key in ("val_ood", "test_ood"):
        if getattr(options, key) is not None:
            values[key] = tuple(getattr(options, key))
    spec = build_spec(values, options.networks.dataset)
    if options.networks.dataset in (*(spec.val_ood or ()), *spec.test_ood):
        raise ConfigError(f"the in-distribution data set {options.networks.dataset!r} cannot also be an OOD set")
    return space, base, spec


def tune(options: TuneOptions) -> TuneOutcome:
    """Tune the networks of ``options`` into its run; then the final seeds and the full search of the best.

    Raises:
        DensituneError: bad input (flags, names, a missing data set, a run that is not writable, a held lock):
            checked before anything is written.
    """

    check_resource_flags(options)
    store = session.run_store(options.out)
    space, base, spec = _check(options)
    from densitune.results.store import remove_stale_temp_files
    from densitune.search.ondemand import TuneRun, ranked, run_tune
    from densitune.search.prepare import check_data
    from densitune.trainables.train.loop import check_training_folder
    from densitune.trainables.train.tune import TrainRun

    check_training_folder(base)
    for name, root in ((options.networks.dataset, options.networks.data_root), *((n, options.networks.data_root) for n in (*(spec.val_ood or ()), *spec.test_ood))):
        check_data(name, root)
    train_run = TrainRun(experiment=options.networks.experiment, models_dir=str(store.models), results_dir=str(store.results),
                         storage_path=store.tune, cpus_per_trial=options.cpus_per_trial, resume=options.resume,
                         log_file=str(store.log_file), compile=options.compile)
    run = TuneRun(experiment=options.networks.experiment, train=train_run, space=space, base=base, spec=spec,
                  rung_grid=tuple((d, float(e)) for d, e in options.rung_grid), cpus_per_trial=options.cpus_per_trial,
                  gpus_per_trial=options.gpus_per_trial)
    where: dict[str, Any] = {"experiment": options.networks.experiment}
    with writer_lease(store.root, "tune", options.networks.experiment) as lease:
        remove_stale_temp_files(train_run.results_dir, options.networks.experiment)
        log_to_file(train_run.log_file)
        session.header(options, f"tune {options.networks.experiment}: {options.num_networks} network(s) on {options.networks.dataset}, "
                        f"{options.networks.epochs} epochs at most, selecting on {spec.protocol_label}",
                        {"models": store.models / options.networks.experiment, "rows": store.results, "log": train_run.log_file})
        session.start_ray(options, store, options.networks.data_root)
        try:
            rows = ranked(run_tune(run, num_networks=options.num_networks, resume=options.resume, seed=options.seed,
                                   time_budget_s=options.time_budget, max_gpu_hours=options.max_gpu_hours,
                                   verbose=1 if options.verbose else 0, progress=not options.quiet), spec.mode)
            _final_seeds(options, run, rows)
        except KeyboardInterrupt as stop:
            session.stop_ray_unless_terminated(stop)
            if lease.lost is not None:
                return TuneOutcome(LockLost(f"{lease.lost}; this tune stopped without writing more"), **where)
            return TuneOutcome(session.interrupted(_status(run), options.resume_hint, stop), **where)
        except DensituneError as e:  # a failed trial, the GPU-hour or time budget
            return TuneOutcome(session.failed(e, _status(run), options.resume_hint), **where)
    final = _final_search(options, spec, run, rows) if options.keep else None
    error = final.error if final is not None else None
    return TuneOutcome(error, trials=tuple(rows), final=final, **where)


def _status(run: TuneRun) -> str:
    from densitune.search.ondemand import finished_trials

    return f"{len(finished_trials(run.results_dir, run.experiment))} network trial(s) recorded in {run.results_dir}"


def _final_seeds(options: TuneOptions, run: TuneRun, rows: list[dict[str, Any]]) -> None:
    """Train the winning network config on seeds 1 .. final_seeds - 1 (seed 0 is the tuned one)."""
    from densitune.trainables.train.tune import run_training

    finished = [r for r in rows if r["tune_status"] == "finished"]
    if options.final_seeds <= 1 or not finished:
        return
    best = run.space.network(run.base, json.loads(finished[0]["search_params"]))
    run_training([replace(best, seed=s) for s in range(1, options.final_seeds)], replace(run.train, resume=True),
                 gpus_per_trial=options.gpus_per_trial, max_gpu_hours=options.max_gpu_hours,
                 verbose=1 if options.verbose else 0, progress=not options.quiet)


def _final_search(options: TuneOptions, spec: Any, run: TuneRun, rows: list[dict[str, Any]]) -> SearchOutcome:
    """The full search (``<experiment>-final``) over the top ``keep`` finished networks (every seed trained)."""
    from densitune.search.models import discover
    from densitune.search.prepare import build_spec

    names = list(dict.fromkeys(run.space.network(run.base, json.loads(r["search_params"])).name
                               for r in rows if r["tune_status"] == "finished"))[:options.keep]
    groups = [g for g in discover(location(run.train.models_dir) / options.networks.experiment) if g.key in names]
    values = {**options.search_values, "experiment": f"{options.networks.experiment}-final", "val_ood": spec.val_ood,
              "test_ood": spec.test_ood, "val_agg": spec.val_agg, "metric": spec.metric, "data_root": options.networks.data_root,
              "eval_limit": options.eval_limit}
    final = build_spec(values, options.networks.dataset)
    run_options = {f: getattr(options, f) for f in RunOptions.__dataclass_fields__}
    return search(SearchOptions(**run_options, spec=final, groups=tuple(groups)))
