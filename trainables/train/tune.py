"""Ray Tune adapter for training: a thin trainable around :func:`densitune.trainables.train.loop.fit`.

All Tune calls for training live here (their API churns between Ray releases; this
module follows Ray >= 2.51: everything from ``ray.tune``).
"""

from __future__ import annotations

import itertools
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import torch

from densitune.checks import error_summary
from densitune.errors import CheckpointError, ConfigError, TrainingError
from densitune.results.rows import provenance, result_row
from densitune.results.store import COMPACT_EVERY, RollingCompaction, write_rows
from densitune.run.console import log_to_file
from densitune.run.failures import MAX_RETRIES, check_budget, fatal_stopper, guarded, raise_fatal
from densitune.run.ray_runtime import (
    compaction_callback,
    progress_callback,
    require_cuda_for_assigned_gpus,
    trial_resources,
)
from densitune.run.runstore import RunPath, location, tune_storage
from densitune.run.storage import fatal_storage, storage_failure
from densitune.trainables.train.checkpoint import read_checkpoint, read_config, save_checkpoint
from densitune.trainables.train.config import TrainConfig, check_experiment_name
from densitune.trainables.train.loop import EpochState, fit

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainRun:
    """Where a training run writes: final models, Parquet rows, Tune's own state."""

    experiment: str
    models_dir: str  # final checkpoints: <models_dir>/<experiment>/<config.key>/
    results_dir: str  # Parquet rows (stage "train", one file per epoch)
    storage_path: str  # Tune's experiment folders and the per-epoch training state
    cpus_per_trial: float = 1.0
    resume: bool = False  # continue unfinished networks from their last epoch
    log_file: str | None = None  # per-epoch lines of every worker (densitune.run.console.log_to_file)
    compile: str = "auto"  # torch.compile the training step: auto | on | off (loop.resolve_compile)
    compact_every: int = COMPACT_EVERY  # the driver merges finished networks' epoch files in groups of this many (0: off)

    def __post_init__(self) -> None:
        check_experiment_name(self.experiment)

    def model_dir(self, config: TrainConfig) -> RunPath:
        return location(self.models_dir) / self.experiment / config.key

    def state_dir(self, config: TrainConfig) -> RunPath:
        """The latest epoch's full state (weights, centers, optimiser, schedule) of one network."""
        return location(self.storage_path) / "state" / self.experiment / config.key


def is_trained(run: TrainRun, config: TrainConfig) -> bool:
    """True when the final checkpoint of ``config`` exists and has all its epochs."""
    try:
        meta = read_config(run.model_dir(config))
    except CheckpointError:
        return False
    return isinstance(meta, dict) and meta.get("config") == config.to_dict() and meta.get("epoch") == config.epochs


def saved_state(run: TrainRun, config: TrainConfig) -> dict[str, Any] | None:
    """The per-epoch state to continue ``config`` from with ``run.resume``, or None to start fresh.

    The state folder is named by :attr:`TrainConfig.key`, which includes a hash of the whole
    config, so another config (e.g. more epochs: the shorter run's cosine schedule has already
    decayed) has its own folder and starts fresh. A state in the folder that was saved under
    another config anyway (copied by hand) is not continued either: a warning, and training
    starts from scratch. So is a state that cannot be read.
    """
    if not run.resume or not (run.state_dir(config) / "model.pt").is_file():
        return None
    try:
        state = read_checkpoint(run.state_dir(config))
    except CheckpointError as e:
        log.warning("%s: not resuming, starting fresh: %s", config.key, e)
        return None
    saved = state.get("config")
    if saved != config.to_dict():
        if isinstance(saved, dict):
            keys = sorted(k for k in set(saved) | set(config.to_dict()) if saved.get(k) != config.to_dict().get(k))
            what = f"was saved under another training config (it differs in {', '.join(keys)})"
        else:
            what = "has no readable training config"
        log.warning("%s: the saved training state in %s %s; starting fresh", config.key, run.state_dir(config), what)
        return None
    if not state.get("optimizer") or not state.get("scheduler") or not isinstance(state.get("epoch"), int):
        log.warning("%s: the saved training state in %s is incomplete; starting fresh", config.key, run.state_dir(config))
        return None
    if state["epoch"] >= config.epochs:  # finished, but its final model is gone: nothing to continue
        log.warning("%s: the saved training state is complete but the final model is missing; starting fresh", config.key)
        return None
    return state


def train_trainable(config: dict[str, Any], run: TrainRun, configs: dict[str, dict[str, Any]]) -> None:
    """Tune function trainable: train one config, report + checkpoint every epoch, resume from Tune.

    ``config["key"]`` names the model; ``configs`` (passed through the object store)
    maps keys to full training configs, so Tune's trial table shows readable names.
    """
    from ray import tune

    log_to_file(run.log_file)
    require_cuda_for_assigned_gpus()  # given a GPU: CUDA or one fatal line, never the CPU silently
    cfg = TrainConfig.from_dict(configs[config["key"]])
    torch.set_num_threads(max(1, int(run.cpus_per_trial)))
    resume = None
    checkpoint = tune.get_checkpoint()  # set when Tune retries a failed trial
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = read_checkpoint(d)
    else:
        # `densitune train --resume` after a crash: our own per-epoch state is the record,
        # so resuming works whenever the driver died, even before Tune saved its state.
        resume = saved_state(run, cfg)
        if resume is not None:
            log.info("%s: resuming after epoch %d", cfg.key, resume["epoch"])
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    for st in fit(cfg, resume=resume, compile=run.compile):
        ckpt_args = record_epoch(run, cfg, st, started, t0)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(d, optimizer=st.optimizer, scheduler=st.scheduler, **ckpt_args)
            tune.report(st.metrics, checkpoint=tune.Checkpoint.from_directory(d))


def record_epoch(run: TrainRun, cfg: TrainConfig, st: EpochState, started: datetime, t0: float) -> dict[str, Any]:
    """Record one finished epoch of ``cfg``: its Parquet row (stage "train"), the final model after the last
    epoch, and the per-epoch state that ``resume`` continues from. Returns the checkpoint's arguments
    (``densitune tune`` trains through this too, so a network it trains is one ``densitune train`` would reuse)."""
    final = st.epoch == cfg.epochs
    row = result_row(
        experiment=run.experiment, trial_id=cfg.key, stage="train", protocol="train", network=cfg,
        started_at=started, provenance=provenance(**st.provenance), split="val", seed=cfg.seed, epoch=st.epoch,
        train_loss=st.train_loss, id_accuracy=st.val_accuracy, duration_s=time.perf_counter() - t0,
        checkpoints=[str(run.model_dir(cfg))] if final else None,
    )
    log.info("%s epoch %d/%d: train loss %.4f, validation accuracy %.4f (%.1fs)", cfg.key, st.epoch, cfg.epochs,
             st.train_loss, st.val_accuracy, row["duration_s"])
    ckpt_args: dict[str, Any] = dict(config=cfg, model=st.model, loss=st.loss, data=st.data, epoch=st.epoch, metrics=st.metrics)
    with fatal_storage(run.results_dir):  # a failed write is fatal: it stops the whole run (densitune.run.failures)
        write_rows(run.results_dir, [row], name=epoch_file_name(cfg.key, st.epoch))
        if final:  # the model store keeps weights only: no optimiser state
            save_checkpoint(run.model_dir(cfg), **ckpt_args)
        # After the final model (a crash in between leaves the state one epoch behind,
        # so a resumed run redoes the last epoch and writes the model).
        save_checkpoint(run.state_dir(cfg), optimizer=st.optimizer, scheduler=st.scheduler, **ckpt_args)
    return ckpt_args


def epoch_file_name(key: str, epoch: int) -> str:
    """The name one epoch's row of network ``key`` is written under (a resumed network rewrites its epoch's file)."""
    return f"{key}-e{epoch:04d}"


def expand_grid(base: TrainConfig, grid: dict[str, Sequence[Any]]) -> list[TrainConfig]:
    """The product of ``grid`` values over ``base``; each combination validated."""
    keys = list(grid)
    return [replace(base, **dict(zip(keys, values))) for values in itertools.product(*(grid[k] for k in keys))]


def run_training(
    configs: Sequence[TrainConfig],
    run: TrainRun,
    *,
    gpus_per_trial: float | None = None,
    max_failures: int = MAX_RETRIES,
    max_gpu_hours: float | None = None,
    verbose: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Train ``configs`` as Ray Tune trials (one per config); returns each trial's last metrics.

    Configs whose final checkpoint already exists are skipped; with ``run.resume`` the
    unfinished ones continue from their last epoch's state (see :meth:`TrainRun.state_dir`
    and :func:`saved_state`). ``progress`` shows a live progress bar on stderr. Ctrl-C raises
    KeyboardInterrupt here (see :func:`densitune.run.console.quiet_ray`); finished epochs and
    models are on disk, and ``run.resume`` continues the rest.

    A trial lost with its node is retried from its last epoch (``max_failures`` times, see
    :mod:`densitune.run.failures`); a fatal error stops the whole run at once.

    Raises:
        ConfigError: two configs share a key.
        DensituneError: a trial failed fatally, or ``max_gpu_hours`` was reached (the run is resumable).
        TrainingError: a trial failed (after ``max_failures`` retries); the one-line message
            names the first failed trial's key and the last line of its error.
    """
    from ray import tune

    by_key = {c.key: c.to_dict() for c in configs}
    if len(by_key) != len(configs):
        dup = sorted({c.key for c in configs if sum(o.key == c.key for o in configs) > 1})
        raise ConfigError(f"two training configs share a key (they differ only in settings the key leaves out): {', '.join(dup)}")
    resources = trial_resources(run.cpus_per_trial, gpus_per_trial)
    trainable = tune.with_resources(
        tune.with_parameters(guarded(train_trainable, "val_accuracy"), run=run, configs=by_key), resources,
    )
    stopper = fatal_stopper(resources.get("gpu", 0.0), max_gpu_hours)
    todo = [c for c in configs if not is_trained(run, c)]
    if len(todo) < len(configs):
        log.info("%d of %d models already trained; training %d", len(configs) - len(todo), len(configs), len(todo))
    if not todo:
        return []
    tuner = tune.Tuner(
        trainable,
        param_space={"key": tune.grid_search([c.key for c in todo])},
        tune_config=tune.TuneConfig(reuse_actors=True, metric="val_accuracy", mode="max"),
        run_config=tune.RunConfig(
            name=f"train-{run.experiment}",
            **tune_storage(run.storage_path),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=max_failures),
            callbacks=[progress_callback(len(todo), "val_accuracy", "max", what="train", show=progress),
                       compaction_callback(RollingCompaction(run.results_dir, run.experiment, run.compact_every, "train"),
                                           lambda trial: [epoch_file_name(trial.config["key"], e)
                                                          for e in range(1, by_key[trial.config["key"]]["epochs"] + 1)])],
            stop=stopper,
            verbose=verbose,
        ),
    )
    results = tuner.fit()
    raise_fatal(results, "training", "key", TrainingError)
    check_budget(stopper, max_gpu_hours, "train")
    failed = [r for r in results if r.error is not None]  # type: ignore[attr-defined]
    failure = storage_failure([r.error for r in failed])
    if failure is not None:  # the first failed write stopped the run
        raise failure
    if failed:
        first = failed[0]
        key = (first.config or {}).get("key", "?")
        raise TrainingError(
            f"{len(failed)} of {len(todo)} training trial(s) failed; first: {key}: {error_summary(first.error, last=True)}"
        )
    return [dict(r.metrics or {}) for r in results]  # type: ignore[attr-defined]

