"""Row -> trial replay: rebuild a recorded trial from its results rows, as the search ran it.

A results row names a trial's score, density and parameters, ε, seed and checkpoints; the experiment's stored
search spec (``_spec.json``) names its data root, evaluation subsets and batch size. :func:`replay_trial` turns the
rows of one trial into a :class:`TrialReplay`, which gives back what the search computed: the density fitted on the
training split (:meth:`TrialReplay.fitted_density`, what ``densitune export`` saves) and the raw test scores
(:meth:`TrialReplay.test_scores`, what ``densitune plot`` draws). The one home of that replay: the export
(:func:`densitune.api.export_detector`) and the figures (:mod:`densitune.search.report.plots`) both use it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from torch import Tensor

from densitune.errors import ConfigError, ResultsError
from densitune.results.store import SPEC_FILE, read_spec
from densitune.search.evaluate import Workspace, test_score_arrays
from densitune.search.ood.densities import Density
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.trainables.data import SplitKey

__all__ = ["TrialReplay", "replay_trial"]


def _seed(value: Any) -> int | None:
    """A row's ``seed`` (an int; None or NaN for an ensemble's rows, as pyarrow or pandas give it)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return int(value)


@dataclass(frozen=True)
class TrialReplay:
    """One recorded trial, ready to be computed again.

    ``members``: (seed, checkpoints) in the order the rows name them; one per seed for a single-network score,
    one ``(None, every checkpoint)`` for an ensemble. ``spec``: the experiment's stored search spec (None when the
    experiment has none: an export then uses the networks' own data root and the default batch size).
    """

    experiment: str
    trial_id: str
    params: TrialParams
    members: tuple[tuple[int | None, tuple[str, ...]], ...]
    spec: SearchSpec | None

    @property
    def seeds(self) -> list[int | None]:
        return [seed for seed, _ in self.members]

    @property
    def batch_size(self) -> int:
        """The scoring batch size of the search (its spec's; the spec's default without one)."""
        return self.spec.batch_size if self.spec is not None else cast(int, SearchSpec.__dataclass_fields__["batch_size"].default)

    def at_eps(self, eps: float) -> TrialReplay:
        """The same configuration with another ε (a configuration's plain and ip trials share their networks)."""
        return dataclasses.replace(self, params=dataclasses.replace(self.params, eps=float(eps)))

    def fitted_density(self, ws: Workspace, checkpoint: str) -> Density:
        """The trial's density fitted on ``checkpoint``'s clean training features, as the search fitted it: the
        training split of the network's data set (whole, from the spec's data root, else the network's own),
        features at the spec's batch size, through ``ws``'s caches (so a run's cache folder is reused)."""
        loaded = ws.model(checkpoint)
        root = (self.spec.data_root if self.spec is not None else None) or loaded.config.data_root
        key = SplitKey(loaded.data["name"], "train", tuple(loaded.data["shape"]), root,  # the search's training split
                       int(loaded.data.get("data_seed", 0)), None)
        feats = ws.features(checkpoint, key, key.load(), self.batch_size)
        return ws.density(checkpoint, self.params.density, feats, key)

    def test_scores(self, ws: Workspace, checkpoints: Sequence[str]) -> dict[str, Tensor]:
        """Raw (N,) float64 test scores of ``checkpoints`` under the trial's configuration: key ``"id"`` for the ID
        test split and each test OOD set and attack by its ``ood_dataset`` name (higher = more in-distribution).

        Raises:
            ResultsError: the experiment has no stored spec (its evaluation subsets are unknown).
        """
        if self.spec is None:
            raise ResultsError(f"no {SPEC_FILE} for experiment {self.experiment!r}: re-scoring needs the search spec")
        return test_score_arrays(ws, self.spec, list(checkpoints), self.params)


def replay_trial(results_dir: str | Path, rows: Sequence[Mapping[str, Any]], *, need_spec: bool = False) -> TrialReplay:
    """The trial that wrote ``rows`` (every row of one trial of one experiment: pyarrow's ``to_pylist()`` or
    pandas' ``to_dict("records")``), with its experiment's stored spec read from ``results_dir``.

    Raises:
        ConfigError: ``rows`` is empty or spans several trials.
        ResultsError: ``need_spec`` and the experiment has no stored spec, or the stored spec is corrupt.
    """
    if not rows:
        raise ConfigError("no rows to replay")
    trials = {(r["experiment"], r["trial_id"]) for r in rows}
    if len(trials) != 1:
        raise ConfigError(f"rows of one trial are replayed, got {len(trials)} trials")
    ((experiment, trial_id),) = trials
    first = rows[0]
    stored = read_spec(results_dir, experiment)
    if stored is None and need_spec:
        raise ResultsError(
            f"no {SPEC_FILE} for experiment {experiment!r}: histograms and ROC curves need the search spec "
            "(plot the ε curves alone with scores=False / --no-scores)"
        )
    members: dict[int | None, tuple[str, ...]] = {}
    for r in rows:
        members.setdefault(_seed(r["seed"]), tuple(r["checkpoints"]) if r["checkpoints"] is not None else ())
    label = f"{first.get('backbone')}-D{first.get('D')}"
    params = TrialParams(label, first["score"], DensitySpec.from_columns(first["density"], first["density_params"]),
                         float(first["eps"]))
    spec = SearchSpec.from_dict(stored) if stored is not None else None
    return TrialReplay(experiment, trial_id, params, tuple(members.items()), spec)
