"""Services that tidy a run: ``compact`` (merge finished experiments' files) and ``clean`` (after a crashed driver)."""

from __future__ import annotations

import os
from pathlib import Path

from densitune.errors import ConfigError, ResultsError
from densitune.run.cleanup import clean_run
from densitune.run.runlock import LockedError, writer_lock
from densitune.run.runstore import RunStore, glob, is_remote


def compact(run_or_results: str) -> list[str]:
    """Compact every experiment whose writer lock is free; one whose lock is held is skipped (and said so).

    Returns one line per experiment. Raises :class:`ResultsError` when there is nothing to compact.
    """
    from densitune.results.store import compact_experiment, results_dir_of

    results = results_dir_of(run_or_results)
    run = results.parent if results.name == "results" else results
    folders = glob(results, "experiment=*") if results.is_dir() else []
    if not folders:
        raise ResultsError(f"no experiments to compact in {results}")
    lines = []
    for folder in folders:
        experiment = folder.name.split("=", 1)[1]
        try:
            with writer_lock(run, "compact", experiment):
                n, rows = compact_experiment(results, experiment)
        except LockedError as e:
            lines.append(f"{experiment}: skipped, {e}")
            continue
        lines.append(f"{experiment}: {n} files merged into one ({rows} rows)" if n else f"{experiment}: nothing to merge")
    return lines


def clean(run_dir: str) -> str:
    """Stop the Ray processes a crashed driver of the run left, remove its Tune folders and cache locks; one line.

    Raises:
        ConfigError: no such run, a session file that proves nothing, or a driver that is still alive.
    """

    run = RunStore(run_dir).local() if is_remote(run_dir) else Path(os.path.expanduser(run_dir)).resolve()
    if not run.is_dir():
        raise ConfigError(f"run directory not found: {run}")
    done = clean_run(run)
    if done.ignored:
        raise ConfigError(f"ignored {done.ignored}; no process signalled, nothing removed")
    if done.driver_alive:
        raise ConfigError(f"{run} is in use by a running densitune; nothing cleaned")
    return (f"stopped {len(done.stopped)} orphaned Ray process(es); "
            f"removed {len(done.removed)} Tune folder(s) and lock file(s)")
