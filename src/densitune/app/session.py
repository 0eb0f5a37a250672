"""What the run services share: a run's options on Ray, its store, the Ray session, console lines, the outcome.

A service (:mod:`densitune.app.train`, :mod:`~densitune.app.search`, :mod:`~densitune.app.studies`,
:mod:`~densitune.app.demo`) checks its typed options before Ray starts and before anything is written
(bad input raises :class:`~densitune.errors.DensituneError`: one line, exit status 2 on the command line),
then holds the writer lock, runs the Ray session and returns an :class:`Outcome`. A run that stopped
(Ctrl-C, a failed trial, the GPU-hour budget) is an outcome too: its ``error`` carries the honest account
(what finished, what not) and the command that continues it (``resume_hint``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from densitune.app.doctor import preflight
from densitune.errors import DensituneError
from densitune.kernels import pin_portable_kernels
from densitune.run.cleanup import clean_run, record_session
from densitune.run.console import Interrupted, Terminated, sigterm_as_interrupt, terminated
from densitune.run.ray_runtime import init_ray, trial_resources
from densitune.run.runstore import RunStore
from densitune.run.storage import check_writable

if TYPE_CHECKING:
    from densitune.run.runstore import RunStore

log = logging.getLogger("densitune")

#: What continues a run started from Python (the command line passes ``densitune ... --resume``).
LIBRARY_HINT = "the same call with resume=True"


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """Where a run writes and what its Ray session gets (the flags common to ``train`` and ``search``)."""

    out: str = "densitune-runs"  # the run: a folder, file://, s3://bucket/prefix
    address: str | None = None  # a Ray cluster (e.g. "auto"); None: start Ray locally
    num_cpus: int | None = None  # CPUs of a local Ray (None: all)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # None: 1 when this machine has a GPU, else 0 (required with ``address``)
    max_gpu_hours: float | None = None  # stop (resumable) after about this many GPU-hours of trials
    resume: bool = False
    quiet: bool = False  # no header, progress bar or summary lines
    verbose: bool = False  # per-epoch / per-trial lines and Ray Tune's own output on the console
    resume_hint: str = LIBRARY_HINT  # how the user continues this run (named in the account of a stopped run)
    reproducible: bool = False  # pin every process to portable kernels (densitune.kernels; README "Same numbers")
    doctor: bool = True  # with ``address``: check every node first (densitune doctor); False: --no-doctor


@dataclass(frozen=True)
class Outcome:
    """How a service ended: ``error`` is None when it finished, else why it stopped (with the account)."""

    error: DensituneError | Interrupted | None = None

    @property
    def status(self) -> int:
        """The exit status: 0 finished, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM), 2 failed."""
        if self.error is None:
            return 0
        return self.error.exit_code if isinstance(self.error, Interrupted) else 2

    def raise_for_status(self) -> None:
        """Raise the error of a stopped run (the library functions do: a notebook sees an exception)."""
        if self.error is not None:
            raise self.error


def interrupted(account: str, hint: str, cause: BaseException | None = None) -> Interrupted:
    """The error of a run stopped by Ctrl-C or SIGTERM (``cause``): what finished, and the command that continues it."""
    return Interrupted(f"{account}; continue with: {hint}",
                       Terminated.exit_code if cause is not None and terminated(cause) else 130)


def failed(e: DensituneError, account: str, hint: str) -> DensituneError:
    """The error of a run stopped by ``e`` (a failed trial, a fatal error, the budget), with the account."""
    return type(e)(f"{e}; {account}; after fixing it, continue with: {hint}")


def say(options: Any, text: str) -> None:
    """A line on stdout (not with ``quiet``)."""
    if not getattr(options, "quiet", False):
        print(text, flush=True)


def header(options: Any, what: str, where: dict[str, Any]) -> None:
    """What will run and where its results go: the one header of a run (not with ``quiet``)."""
    say(options, f"densitune {what}\n  " + "; ".join(f"{k}: {v}" for k, v in where.items()))


def run_store(out: str) -> RunStore:
    """The run named by ``out``, checked writable before anything is written (a dangling link is refused)."""

    check_writable(out)
    return RunStore(out)


def start_ray(options: RunOptions, store: RunStore, data_root: str | None = None) -> None:
    """Stop what a crashed earlier driver of this run left running, start Ray (once per process), and record
    its session (in the run folder, or for a run in a bucket in this machine's own folder for it). On a cluster,
    check its nodes first (:func:`densitune.app.doctor.preflight`: ``--out`` and ``data_root``), unless ``--no-doctor``."""

    done = clean_run(store.local(), prune=False)
    if done.ignored:
        log.warning("ignoring %s (it proves no process of a crashed driver); no process signalled", done.ignored)
    env_vars = pin_portable_kernels() if options.reproducible else None  # before Ray starts its workers
    init_ray(options.address, options.num_cpus, verbose=options.verbose, quiet=options.quiet, env_vars=env_vars)
    sigterm_as_interrupt()  # after ray.init, which installs a handler of its own
    trial_resources(options.cpus_per_trial, options.gpus_per_trial)  # a trial no node can ever run: refused now
    if options.address and options.doctor:
        preflight(options, data_root)  # every node, before any trial starts: one line per problem, exit 2
    if options.address is None:  # a Ray this process started (never a cluster's)
        record_session(store.local())


def stop_ray() -> None:
    """Shut Ray down (its workers with it), so that what the results hold stops changing."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def stop_ray_unless_terminated(stop: BaseException) -> None:
    """After Ctrl-C, shut Ray down before the account is taken (so no trial writes after it). After SIGTERM the
    account comes first: whoever sent it (``ray job stop``, a batch scheduler) sends SIGKILL a few seconds later,
    and Ray's shutdown takes about that long, so the account is printed at once and Ray stops as the process
    exits. A trial that finishes meanwhile is recorded once more than the account says; ``--resume`` skips it."""
    if not terminated(stop):
        stop_ray()
