"""The search's trials mirrored into an Optuna study on disk, for ``optuna-dashboard`` and ``optuna.load_study``.

The Parquet results stay the record (resume reads them, never this study). The mirror is written
from a Tune callback as each trial finishes, and brought up to date from the results when a search
(re)starts, so a trial finished just before a crash is not missing from it.

Storage: one study per search experiment (named after it), under that experiment's own prefix
``RUN/optuna/<experiment>/``, written only by the holder of the experiment's writer lock (each write
behind its fence, :class:`densitune.run.runlock.HeldLock`), and only ever appended to:

* a local run: an Optuna journal file, ``RUN/optuna/<experiment>/journal.log``;
* a run in a bucket: one record object per append (``records/<number of its first log>.jsonl``, the
  journal's own lines), merged in order on read (:class:`RecordBackend`); no object is rewritten, so two
  experiments searched at once, from two machines, keep both studies whole. :func:`local_journal`
  concatenates them into a journal file for ``optuna-dashboard`` or ``JournalFileBackend``.

Parameters are the grid's own, not one opaque ``point`` string: ``model`` (or ``ensemble_model``),
``score``, ``density``, ``<density>.<parameter>`` and ``eps``, as the TPE space names them.

    study = optuna.load_study(study_name="demo-search",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend("RUN/optuna/demo-search/journal.log")))
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution as Cat
from optuna.storages.journal import BaseJournalBackend, JournalFileBackend

from densitune.run.failures import FATAL_KEY
from densitune.run.runlock import LockLost
from densitune.run.runstore import ObjectPath, RunPath, location, publish
from densitune.search.models import ModelGroup
from densitune.search.ood.scores import score_class
from densitune.search.space import DefineByRun, TrialParams, params_from_config
from densitune.search.spec import SearchSpec

log = logging.getLogger(__name__)


def journal_path(results_dir: str | RunPath, experiment: str) -> RunPath:
    """The prefix of one experiment's study: ``RUN/optuna/<experiment>/`` beside ``RUN/results``."""
    return location(results_dir).parent / "optuna" / experiment


JOURNAL_FILE = "journal.log"
RECORDS = "records"


def _lines(logs: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in logs)


class RecordBackend(BaseJournalBackend):
    """An Optuna journal in a bucket as append-only record objects: :meth:`append_logs` publishes one object
    (one PUT, seen whole or not at all) named by the number of its first log, zero-padded; :meth:`read_logs`
    lists the objects and merges them in that order. Only the experiment's lock holder appends."""

    def __init__(self, folder: ObjectPath) -> None:
        self.folder = folder / RECORDS
        self._logs: list[dict[str, Any]] = []
        self._read: set[str] = set()

    def _refresh(self) -> None:
        for p in sorted(self.folder.glob("*.jsonl"), key=lambda p: p.name):
            if p.name in self._read:
                continue
            self._logs.extend(json.loads(line) for line in p.read_text().splitlines() if line.strip())
            self._read.add(p.name)

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        self._refresh()
        return self._logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        self._refresh()
        name = f"{len(self._logs):012d}.jsonl"
        publish(self.folder / name, _lines(logs))
        self._logs.extend(logs)
        self._read.add(name)


def local_journal(path: str | RunPath) -> Path:
    """A journal file of the study at ``path`` (:func:`journal_path`) for ``JournalFileBackend`` or
    ``optuna-dashboard``: the run's own file, or for a run in a bucket its records merged into a copy in the
    temporary folder."""
    folder = location(path)
    if isinstance(folder, Path):
        return folder / JOURNAL_FILE
    local = Path(tempfile.gettempdir()) / "densitune" / f"optuna-{hashlib.sha1(str(folder).encode()).hexdigest()[:12]}.log"
    local.parent.mkdir(parents=True, exist_ok=True)
    publish(local, _lines(RecordBackend(folder).read_logs(0)))
    return local


def open_storage(path: str | RunPath):
    """The Optuna storage of the study at ``path`` (:func:`journal_path`; what ``optuna.load_study`` is given)."""
    folder = location(path)
    if isinstance(folder, ObjectPath):
        return optuna.storages.JournalStorage(RecordBackend(folder))
    folder.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))


class _Replay:
    """Replays the TPE space on known values to recover Optuna's distributions."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.distributions: dict[str, Any] = {}

    def suggest_categorical(self, name, choices):
        self.distributions[name] = optuna.distributions.CategoricalDistribution(choices)
        return self.params[name]

    def suggest_float(self, name, low, high, *, log=False):
        self.distributions[name] = optuna.distributions.FloatDistribution(low, high, log=log)
        return self.params[name]


class StudyMirror:
    """An Optuna study holding one finished trial per search trial (matched by Tune trial id)."""

    def __init__(self, path: str | RunPath, spec: SearchSpec, groups: list[ModelGroup], points: dict[str, TrialParams],
                 fence: Callable[[], None] | None = None) -> None:
        self.path, self.spec, self.points, self.fence = location(path), spec, points, fence
        self.groups = sorted(g.key for g in groups)
        self.ensemble_groups = sorted(g.key for g in groups if len(g.seeds) >= 2)
        self.space = DefineByRun(spec, groups) if spec.sampler == "tpe" else None
        self._study: optuna.Study | None = None
        self.known = {t.user_attrs.get("trial_id") for t in self.study.get_trials(deepcopy=False)}

    @property
    def study(self):
        """The study, opened (or created) on first use."""
        if self._study is None:
            self._study = optuna.create_study(storage=open_storage(self.path), study_name=self.spec.experiment,
                                              load_if_exists=True, direction="minimize" if self.spec.mode == "min" else "maximize")
        return self._study

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks: the open storage stays behind and is reopened on use."""
        return {**self.__dict__, "_study": None}

    def _grid_params(self, p: TrialParams) -> tuple[dict[str, Any], dict[str, Any]]:
        cls = score_class(p.score)
        key = "ensemble_model" if cls.ensemble else "model"
        params: dict[str, Any] = {"score": p.score, key: p.group}
        dists: dict[str, Any] = {"score": Cat(list(self.spec.scores)),
                                 key: Cat(self.ensemble_groups if cls.ensemble else self.groups)}
        if p.density.name:
            # one choice list for every trial (Optuna refuses differing ones): the densities, then the
            # fitted-score models (knn, rmd, vim), whose trials record the model's name as their density
            own = [n for sc in self.spec.scores if (n := score_class(sc).density_name) is not None]
            params["density"], dists["density"] = p.density.name, Cat(list(dict.fromkeys([*self.spec.densities, *own])))
            grid = self.spec.density_params.get(p.density.name, {})
            for k, v in sorted(p.density.params.items()):
                params[f"{p.density.name}.{k}"], dists[f"{p.density.name}.{k}"] = v, Cat(list(grid.get(k, [v])))
        params["eps"], dists["eps"] = p.eps, Cat(sorted({float(e) for e in self.spec.eps_grid} | {p.eps}))
        return params, dists

    def add(self, trial_id: str, search_params: dict[str, Any], value: float) -> None:
        """Record one finished trial (``search_params``: the trial's Tune config), once."""
        if trial_id in self.known:
            return
        if self.fence is not None:  # never a record from a writer whose lock may have lapsed
            self.fence()
        if "point" in search_params:
            label = search_params["point"]
            params, dists = self._grid_params(self.points[label])
        else:
            assert self.space is not None
            replay = _Replay(search_params)
            self.space(replay)
            params, dists = {k: search_params[k] for k in replay.distributions}, replay.distributions
            label = params_from_config(search_params).label
        self.study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=float(value),
                                                       user_attrs={"trial_id": trial_id, "label": label}))
        self.known.add(trial_id)

    def sync(self, done: dict[str, tuple[dict[str, Any], float]]) -> None:
        """Add the trials of the results (``completed_trials``) that the study lacks."""
        for trial_id, (search_params, value) in sorted(done.items()):
            self.add(trial_id, search_params, value)


def mirror_callback(mirror: StudyMirror):
    """A Tune callback adding each finished trial to ``mirror``; a failure to write it is a warning only."""
    from ray.tune import Callback

    objective = mirror.spec.objective

    class _Mirror(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            value = result.get(objective)
            if value is None or result.get(FATAL_KEY):  # a fatal trial reported no value (densitune.run.failures)
                return
            try:
                mirror.add(trial.trial_id, dict(trial.config), value)
            except LockLost:
                raise  # the run stops: this driver may no longer write
            except Exception as e:  # noqa: BLE001 - the mirror must never stop a search
                log.warning("Optuna study %s: trial %s not mirrored: %s", mirror.path, trial.trial_id, json.dumps(str(e)))

    return _Mirror()
