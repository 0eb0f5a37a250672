"""The search's trials mirrored into an Optuna study on disk, for ``optuna-dashboard`` and ``optuna.load_study``.

The Parquet results stay the record (resume reads them, never this study). The mirror is written
from a Tune callback as each trial finishes, and brought up to date from the results when a search
(re)starts, so a trial finished just before a crash is not missing from it.

Storage: a journal file, ``RUN/optuna/journal.log`` (one study per search experiment, named after
it). Parameters are the grid's own, not one opaque ``point`` string: ``model`` (or ``ensemble_model``),
``score``, ``density``, ``<density>.<parameter>`` and ``eps``, as the TPE space names them.

    study = optuna.load_study(study_name="demo-search",
                              storage=optuna.storages.JournalStorage(
                                  optuna.storages.journal.JournalFileBackend("RUN/optuna/journal.log")))
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from densitune.run.failures import FATAL_KEY
from densitune.run.runstore import ObjectPath, RunPath, location, publish
from densitune.search.models import ModelGroup
from densitune.search.ood.scores import score_class
from densitune.search.space import DefineByRun, TrialParams, params_from_config
from densitune.search.spec import SearchSpec

log = logging.getLogger(__name__)


def journal_path(results_dir: str | RunPath) -> RunPath:
    """Where the study of a run's searches lives: ``RUN/optuna/journal.log`` beside ``RUN/results``."""
    return location(results_dir).parent / "optuna" / "journal.log"


def _local_copy(path: ObjectPath) -> Path:
    return Path(tempfile.gettempdir()) / "densitune" / f"optuna-{hashlib.sha1(str(path).encode()).hexdigest()[:12]}" / path.name


def staged_journal(path: RunPath) -> Path:
    """The local file an Optuna journal is used through: ``path`` itself, or for a run in a bucket a copy in
    the temporary folder (downloaded when the study is opened, uploaded after each trial it records)."""
    if isinstance(path, Path):
        return path
    local = _local_copy(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    local.unlink(missing_ok=True)
    if path.is_file():
        local.write_bytes(path.read_bytes())
    return local


def open_storage(path: str | RunPath):
    """The journal-file storage at ``path`` (what ``optuna.load_study`` is given; see :func:`staged_journal`)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    local = staged_journal(location(path))
    local.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(local)))


class _Replay:
    """Replays the TPE space on known values to recover Optuna's distributions."""

    def __init__(self, params: dict[str, Any]) -> None:
        self.params = params
        self.distributions: dict[str, Any] = {}

    def suggest_categorical(self, name, choices):
        import optuna

        self.distributions[name] = optuna.distributions.CategoricalDistribution(choices)
        return self.params[name]

    def suggest_float(self, name, low, high, *, log=False):
        import optuna

        self.distributions[name] = optuna.distributions.FloatDistribution(low, high, log=log)
        return self.params[name]


class StudyMirror:
    """An Optuna study holding one finished trial per search trial (matched by Tune trial id)."""

    def __init__(self, path: str | RunPath, spec: SearchSpec, groups: list[ModelGroup], points: dict[str, TrialParams]) -> None:
        import optuna

        self.path, self.spec, self.points = location(path), spec, points
        self.groups = sorted(g.key for g in groups)
        self.ensemble_groups = sorted(g.key for g in groups if len(g.seeds) >= 2)
        self.space = DefineByRun(spec, groups) if spec.sampler == "tpe" else None
        self._study: optuna.Study | None = None
        self.known = {t.user_attrs.get("trial_id") for t in self.study.get_trials(deepcopy=False)}

    @property
    def study(self):
        """The study, opened (or created) on first use."""
        import optuna

        if self._study is None:
            self._study = optuna.create_study(storage=open_storage(self.path), study_name=self.spec.experiment,
                                              load_if_exists=True, direction="minimize" if self.spec.mode == "min" else "maximize")
        return self._study

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks: the open storage stays behind and is reopened on use."""
        return {**self.__dict__, "_study": None}

    def _grid_params(self, p: TrialParams) -> tuple[dict[str, Any], dict[str, Any]]:
        from optuna.distributions import CategoricalDistribution as Cat

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
        import optuna

        if trial_id in self.known:
            return
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
        if not isinstance(self.path, Path):  # a run in a bucket: publish the staged journal
            publish(self.path, _local_copy(self.path).read_bytes())

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
            except Exception as e:  # noqa: BLE001 - the mirror must never stop a search
                log.warning("Optuna study %s: trial %s not mirrored: %s", mirror.path, trial.trial_id, json.dumps(str(e)))

    return _Mirror()
