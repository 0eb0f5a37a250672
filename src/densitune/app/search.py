"""The search service: ``search(SearchOptions) -> SearchOutcome`` (``densitune search``, studies, the demo).

The spec and the networks are checked before Ray starts and before anything is written: from spec
values (a ``--spec`` file's and the flags', the trained networks found under ``models``), or as a
built :class:`~densitune.search.spec.SearchSpec` with the exact model groups to search (a study's part).
Then, holding the experiment's writer lock, the service removes stale temporary files, refuses to mix
a new search into an old experiment (or to resume one with another spec), stores the spec beside its
rows, starts Ray and runs the search (:func:`densitune.search.tune.run_search`). A search that stopped
or left trials missing is never reported as finished: its outcome counts what was recorded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

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
from densitune.errors import ConfigError, DensituneError
from densitune.run.console import log_to_file
from densitune.run.resource_flags import check_resource_flags
from densitune.run.runlock import LockLost, writer_lease

if TYPE_CHECKING:
    from densitune.search.models import ModelGroup
    from densitune.search.spec import SearchSpec
    from densitune.search.tune import SearchRun

log = logging.getLogger("densitune")


@dataclass(frozen=True, kw_only=True)
class SearchOptions(RunOptions):
    """What to search: spec ``values`` (spec keys; ``models`` defaults to ``RUN/models``), or a built ``spec``
    with the exact ``groups`` of networks to search (their checkpoints are read and checked here)."""

    values: Mapping[str, Any] = field(default_factory=dict)
    spec: SearchSpec | None = None
    groups: tuple[ModelGroup, ...] = ()
    max_concurrent: int | None = None  # trials at once (None: as many as the cluster fits)


@dataclass(frozen=True)
class SearchOutcome(Outcome):
    experiment: str = ""
    trials: int = 0  # trials recorded in the results
    run: str = ""  # the run (folder or bucket URI)
    results_dir: str = ""
    log_file: str = ""
    best: str = ""  # the best configuration, as a table
    top: str = ""  # with ``verbose``: the ranked report of the five best
    report_seconds: float = 0.0  # reading the results and writing the tables above

    @property
    def summary(self) -> str:
        return (f"\nsearch finished: {self.trials} trial(s) in {self.results_dir}; log: {self.log_file}\n"
                f"tables:  densitune report {self.run}  (every table: --full)\n"
                f"figures: densitune plot {self.run}")


def _spec_and_groups(options: SearchOptions, models: str) -> tuple[SearchSpec, list[ModelGroup]]:
    from densitune.search.models import select
    from densitune.search.prepare import check_search, prepare_search

    if options.spec is None:
        return prepare_search({"models": models, **options.values})
    if options.values:
        raise ConfigError("pass spec values or a built spec with its model groups, not both")
    if not options.groups:
        raise ConfigError(f"search {options.spec.experiment}: no networks given")
    spec = options.spec
    groups = select(list(options.groups), spec.dims, spec.backbones, spec.losses)
    check_search(spec, groups)
    return spec, groups


def search_status(run: SearchRun, spec: SearchSpec, total: int) -> str:
    from densitune.search.tune import completed_trials

    done = len(completed_trials(run.results_dir, spec.experiment))
    return f"{done} of {total} search trial(s) finished and recorded in {run.results_dir}, {total - done} not run"


def check_experiment(results_dir: str, spec: SearchSpec, resume: bool) -> None:
    """A new search must not mix into an old experiment; a resumed one must have the same spec."""
    from densitune.results.store import has_results, read_spec

    if not resume:
        if has_results(results_dir, spec.experiment):
            raise ConfigError(f"experiment {spec.experiment!r} already has results in {results_dir}; "
                              "pass --resume to continue it, or choose another --experiment")
        return
    stored, current = read_spec(results_dir, spec.experiment), spec.to_dict()
    if stored is not None:  # a spec stored by an older version: its keys' defaults and forms as today
        with contextlib.suppress(DensituneError, TypeError):
            stored = type(spec).from_dict(stored).to_dict()
    if stored is not None and stored != current:
        diff = sorted(k for k in set(stored) | set(current) if stored.get(k) != current.get(k))
        raise ConfigError(f"--resume with a different search spec than the interrupted run (keys: {', '.join(diff)})")


def search(options: SearchOptions) -> SearchOutcome:
    """Run the search of ``options`` into its run; the outcome holds the best configuration's table.

    Raises:
        DensituneError: bad input (flags, spec, no or corrupt networks, a missing data set, a run that is
            not writable, a held writer lock, an experiment that has results already): nothing written.
    """

    # Flags and the spec first, before torch and Ray are imported: a bad (or huge) spec fails fast and small.
    check_resource_flags(options)
    store = run_store(options.out)
    from densitune.results.store import remove_stale_temp_files, write_spec
    from densitune.search.tune import SearchRun, run_search, trial_budget

    spec, groups = _spec_and_groups(options, str(store.models))
    run = SearchRun(results_dir=str(store.results), storage_path=store.tune, cpus_per_trial=options.cpus_per_trial,
                    gpus_per_trial=options.gpus_per_trial, max_concurrent=options.max_concurrent,
                    cache_dir=str(store.cache), log_file=str(store.log_file))
    where: dict[str, Any] = {"experiment": spec.experiment, "run": str(store), "results_dir": run.results_dir, "log_file": str(run.log_file)}
    with writer_lease(store.root, "search", spec.experiment) as lease:
        run = dataclasses.replace(run, fence=lease.fence)  # each trial checks it before it publishes
        remove_stale_temp_files(run.results_dir, spec.experiment)  # only the lock holder may
        check_experiment(run.results_dir, spec, options.resume)
        log_to_file(run.log_file)
        total = trial_budget(spec, groups)
        header(options, f"search {spec.experiment}: {total} trial(s) ({spec.sampler}) over {len(groups)} model group(s), "
                        f"selecting on {spec.protocol_label}", {"rows": run.results_dir, "log": run.log_file})
        write_spec(run.results_dir, spec.experiment, spec.to_dict())
        start_ray(options, store, spec.data_root)
        try:
            run_search(spec, groups, run, resume=options.resume, verbose=1 if options.verbose else 0,
                       max_gpu_hours=options.max_gpu_hours, progress=not options.quiet, lease=lease)
        except (KeyboardInterrupt, LockLost) as stop:  # Ctrl-C, SIGTERM (Terminated), or the lock lost (fencing)
            stop_ray_unless_terminated(stop)  # Ctrl-C: no trial writes after the account below is taken
            if lease.lost is not None:  # another writer holds the experiment now: say so, and nothing more
                return SearchOutcome(LockLost(f"{lease.lost}; this search stopped without writing more"), **where)
            return SearchOutcome(interrupted(search_status(run, spec, total), options.resume_hint, stop), **where)
        except DensituneError as e:  # failed trials, a fatal error, the GPU-hour budget
            return SearchOutcome(failed(e, search_status(run, spec, total), options.resume_hint), **where)
        return _finished(options, spec, run, total, where)


def _finished(options: SearchOptions, spec: SearchSpec, run: SearchRun, total: int, where: dict[str, Any]) -> SearchOutcome:
    """The outcome of a search whose Tune run ended: every trial recorded, else an account of the missing ones."""

    from densitune.results.store import read_results
    from densitune.search.cache import DiskCache
    from densitune.search.report.tables import best, report
    from densitune.search.tune import completed_trials

    done = len(completed_trials(run.results_dir, spec.experiment))
    if done < total:  # nothing failed, yet trials are missing: never report a partial search as finished
        error = DensituneError(f"{search_status(run, spec, total)}; continue with: {options.resume_hint}")
        return SearchOutcome(error, trials=done, **where)
    events = Counter(kind for kind, _ in DiskCache(str(run.cache_dir)).events())
    log.info("cache %s: %d feature extraction(s), %d density fit(s), %d attacked set(s) computed in all; "
             "every other use was a cache hit", run.cache_dir, events["extract"], events["fit"], events["attack"])
    t_report = time.perf_counter()
    table = read_results(run.results_dir, experiment=spec.experiment)
    top = report(table, spec.metric, top=5) if options.verbose else ""
    text = best(table, spec.metric)
    return SearchOutcome(None, trials=done, best=text, top=top, report_seconds=time.perf_counter() - t_report, **where)
