"""The train service: ``train(TrainOptions) -> TrainOutcome`` (``densitune train``, studies, the demo).

Checks the flags, the networks and the data before Ray starts and before anything is written; then,
holding the experiment's writer lock (:mod:`densitune.run.runlock`), removes the temporary files a
killed write left, stops what a crashed earlier driver of the run left running, starts Ray and trains
every network that is not trained yet (:func:`densitune.trainables.train.tune.run_training`).
Ctrl-C or a failed trial ends in an outcome that says which networks finished and how far the others
got, and names the command that continues the run.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from densitune.app.session import (
    Outcome,
    RunOptions,
    failed,
    header,
    interrupted,
    run_store,
    start_ray,
    stop_ray_unless_terminated,
)
from densitune.errors import CheckpointError, ConfigError, DensituneError
from densitune.run.console import log_to_file
from densitune.run.resource_flags import check_resource_flags, check_seeds
from densitune.run.runlock import LockLost, writer_lease

if TYPE_CHECKING:
    from densitune.trainables.train.config import TrainConfig
    from densitune.trainables.train.tune import TrainRun


@dataclass(frozen=True, kw_only=True)
class TrainGrid:
    """A grid of networks: backbones × D × losses × seeds, with one set of training settings."""

    experiment: str = "default"
    dataset: str = "digits"
    data_root: str | None = None
    backbones: tuple[str, ...] = ("cnn",)
    dims: tuple[int, ...] = (16,)
    losses: tuple[str, ...] = ("ce",)
    seeds: tuple[int, ...] = (0,)
    lam: float = 0.1
    epochs: int = 15
    lr: float = 0.05
    batch_size: int = 64
    spectral: bool = True
    sn_coeff: float = 3.0
    train_limit: int | None = None

    def configs(self) -> list[TrainConfig]:
        """Every network of the grid, in grid order (each validated: names, D, settings)."""
        from densitune.trainables.train.config import TrainConfig

        check_seeds("--seeds", self.seeds)
        return [TrainConfig(backbone=b, feature_dim=d, loss=loss, lam=self.lam, seed=s, epochs=self.epochs, lr=self.lr,
                            batch_size=self.batch_size, spectral=self.spectral, sn_coeff=self.sn_coeff,
                            dataset=self.dataset, data_root=self.data_root, train_limit=self.train_limit,
                            experiment=self.experiment)
                for b, d, loss, s in itertools.product(self.backbones, self.dims, self.losses, self.seeds)]


@dataclass(frozen=True, kw_only=True)
class TrainOptions(RunOptions):
    """What to train: a grid, or an explicit list of configs of one experiment and one data set (a study's)."""

    networks: TrainGrid | tuple[TrainConfig, ...] = field(default_factory=TrainGrid)
    download: bool = False  # download torchvision data sets if missing
    compile: str = "auto"  # torch.compile the training step: auto | on | off


@dataclass(frozen=True)
class TrainOutcome(Outcome):
    configs: tuple[TrainConfig, ...] = ()
    models_dir: str = ""  # RUN/models/<experiment>

    @property
    def summary(self) -> str:
        return f"trained {len(self.configs)} model(s): {self.models_dir}"


def _configs(networks: TrainGrid | Sequence[TrainConfig]) -> list[TrainConfig]:
    configs = networks.configs() if isinstance(networks, TrainGrid) else list(networks)
    if not configs:
        raise ConfigError("nothing to train: no networks given")
    for what in ("experiment", "dataset", "data_root"):
        if len({getattr(c, what) for c in configs}) > 1:
            raise ConfigError(f"one training run trains one {what}; got {sorted({str(getattr(c, what)) for c in configs})}")
    return configs


def _grid_text(configs: Sequence[TrainConfig]) -> str:
    axes = [("backbone", "backbone"), ("D", "feature_dim"), ("loss", "loss"), ("seed", "seed")]
    return " x ".join(f"{name} {','.join(map(str, dict.fromkeys(getattr(c, a) for c in configs)))}" for name, a in axes)


def train_status(run: TrainRun, configs: Sequence[TrainConfig]) -> str:
    """What an interrupted or failed training finished, and what not (from the model store and saved state)."""
    from densitune.trainables.train.checkpoint import read_config
    from densitune.trainables.train.tune import is_trained

    done = [c for c in configs if is_trained(run, c)]
    left = []
    for c in configs:
        if c in done:
            continue
        try:
            epoch = read_config(run.state_dir(c)).get("epoch", 0) if run.state_dir(c).is_dir() else 0
        except CheckpointError:
            epoch = 0
        left.append(f"{c.key} ({epoch}/{c.epochs} epochs saved)")
    return f"{len(done)} of {len(configs)} model(s) trained; not finished: {', '.join(left) or 'none'}"


def train(options: TrainOptions) -> TrainOutcome:
    """Train the networks of ``options`` into its run (those already trained are kept).

    Raises:
        DensituneError: bad input (flags, names, settings, a missing data set, a run that is not
            writable, a held writer lock): checked before anything is written.
    """

    check_resource_flags(options)  # before torch and Ray are imported
    store = run_store(options.out)
    configs = _configs(options.networks)  # validates names, D, ...
    from densitune.results.store import remove_stale_temp_files
    from densitune.search.prepare import check_data
    from densitune.trainables.train.loop import check_training_folder
    from densitune.trainables.train.tune import TrainRun
    from densitune.trainables.train.tune import run_training as tune_training

    first = configs[0]
    check_training_folder(first)  # a folder: data set needs train/ and test/ subfolders
    check_data(first.dataset, first.data_root, options.download)
    run = TrainRun(experiment=first.experiment, models_dir=str(store.models), results_dir=str(store.results),
                   storage_path=store.tune, cpus_per_trial=options.cpus_per_trial, resume=options.resume,
                   log_file=str(store.log_file), compile=options.compile)
    models_dir = str(store.models / first.experiment)
    with writer_lease(store.root, "train", first.experiment) as lease:
        remove_stale_temp_files(run.results_dir, first.experiment)  # only the lock holder may
        log_to_file(run.log_file)
        header(options, f"train {len(configs)} model(s) ({_grid_text(configs)}; {max(c.epochs for c in configs)} epochs) "
                        f"on {first.dataset}", {"models": models_dir, "rows": store.results, "log": run.log_file})
        start_ray(options, store, first.data_root)
        try:
            tune_training(configs, run, gpus_per_trial=options.gpus_per_trial, max_gpu_hours=options.max_gpu_hours,
                          verbose=1 if options.verbose else 0, progress=not options.quiet)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM (Terminated)
            stop_ray_unless_terminated(stop)  # Ctrl-C: no trial writes after the account below is taken
            if lease.lost is not None:  # the lock was lost (densitune.run.runlock): say so, and nothing more
                return TrainOutcome(LockLost(f"{lease.lost}; this training stopped without writing more"),
                                    tuple(configs), models_dir)
            return TrainOutcome(interrupted(train_status(run, configs), options.resume_hint, stop), tuple(configs), models_dir)
        except DensituneError as e:  # a failed trial, a fatal error, the GPU-hour budget
            return TrainOutcome(failed(e, train_status(run, configs), options.resume_hint), tuple(configs), models_dir)
    return TrainOutcome(None, tuple(configs), models_dir)

