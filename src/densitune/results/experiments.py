"""Which search experiment ``best``, ``export``, ``plot`` and ``compare`` read when a run holds several.

A run folder collects every search run into it (``--experiment NAME``). Ranking across all of them would
silently answer from whichever experiment scores highest, so the readers take the **newest** search
experiment by default: the one whose rows hold the latest ``started_at``. The choice is said in one line
(the caller prints it on stderr, never inside machine-readable output). ``--experiment NAME`` takes
another, a ``--where`` that names the ``experiment`` column chooses by itself, and ``--all-experiments``
ranks across all of them.

No Ray, no training loop, no CLI.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, overload

from densitune.errors import ConfigError
from densitune.results.sql import echo, referenced_columns

if TYPE_CHECKING:
    from densitune.run.runstore import RunPath


@dataclass(frozen=True)
class ExperimentChoice:
    """The experiment a reader keeps (None: every row, as the filters say) and the line that says so."""

    experiment: str | None = None
    note: str | None = None

    @overload
    def where(self, where: str) -> str: ...
    @overload
    def where(self, where: None) -> str | None: ...
    def where(self, where: str | None) -> str | None:
        """``where`` (a ``--where`` expression, or None) narrowed to the chosen experiment."""
        if self.experiment is None:
            return where
        own = f"experiment = '{self.experiment.replace(chr(39), chr(39) * 2)}'"
        return own if where is None else f"({where}) AND {own}"


def search_experiments(results_dir: str | RunPath) -> dict[str, object]:
    """Each search experiment of ``results_dir`` with the latest ``started_at`` of its rows (oldest first)."""
    import pyarrow.compute as pc

    from densitune.results.store import read_results

    table = read_results(results_dir, stage="search", columns=("experiment", "started_at"))
    if table.num_rows == 0:
        return {}
    grouped = table.group_by("experiment").aggregate([("started_at", "max")])
    order = pc.sort_indices(grouped, sort_keys=[("started_at_max", "ascending"), ("experiment", "ascending")])
    grouped = grouped.take(order)
    return dict(zip(grouped.column("experiment").to_pylist(), grouped.column("started_at_max").to_pylist(), strict=True))


def choose_experiment(results_dir: str | RunPath, *, experiment: str | None = None, all_experiments: bool = False,
                      wheres: Iterable[str | None] = ()) -> ExperimentChoice:
    """The experiment to read: ``experiment`` if given (it must have search rows), nothing to narrow with
    ``all_experiments`` or when one of ``wheres`` names the ``experiment`` column, else the newest search
    experiment (with a note when there are several to choose from)."""
    from densitune.results.store import COLUMNS

    if experiment is not None and all_experiments:
        raise ConfigError("--experiment and --all-experiments exclude each other: give one")
    if all_experiments:
        return ExperimentChoice()
    if experiment is None and any(w is not None and "experiment" in (referenced_columns(w, COLUMNS, expression=True) or set())
                                  for w in wheres):
        return ExperimentChoice()
    found = search_experiments(results_dir)
    if experiment is not None:
        if experiment not in found:
            known = ", ".join(map(repr, found)) or "none"
            raise ConfigError(f"no search experiment {echo(experiment)} in {results_dir} (search experiments: {known})")
        return ExperimentChoice(experiment)
    if len(found) < 2:
        return ExperimentChoice()
    newest, started = list(found.items())[-1]
    others = ", ".join(name for name in found if name != newest)
    when = f"{started:%Y-%m-%d %H:%M:%S} UTC" if started is not None else "an unknown time"
    return ExperimentChoice(newest, f"densitune: {len(found)} search experiments in {results_dir}; using the newest, "
                                    f"{newest!r} (started {when}; also: {others}). --experiment NAME picks another, "
                                    "--all-experiments ranks across all")
