"""The retry policy, in one place: which failures are worth retrying and which stop the run.

A trial can fail in two ways:

* **transient**: its node was lost (Ray reports the dead actor to the driver; the trial's
  code never sees an exception), or a store request was dropped or throttled
  (``ConnectionError``, ``TimeoutError``, other ``OSError`` of a network file system or
  bucket). Tune retries the trial (``FailureConfig(max_failures=MAX_RETRIES)``): training
  from its last epoch's checkpoint, a search trial from scratch (they are short).
* **fatal**: it would fail the same way again: bad configuration or data
  (:class:`~densitune.errors.DensituneError`), permission denied, a read-only or full
  disk, a diverged loss, a bug. The trial reports it instead of raising
  (:func:`fatal_report`), and the run stops at once with one line naming the cause
  (:class:`FatalStop`), instead of retrying and then running every remaining trial.
"""

from __future__ import annotations

import errno
import functools
import logging
from typing import Any

from densitune.errors import DensituneError
from densitune.run.storage import PREFIX, StorageError

#: How often a trial lost with its node (or to a dropped store request) is retried.
MAX_RETRIES = 3
#: Key of the result a trial reports when it failed fatally.
FATAL_KEY = "fatal_error"

_FATAL_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOENT,
                 errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.ENAMETOOLONG}


def is_fatal(exc: BaseException) -> bool:
    """Whether ``exc``, raised inside a trial, would happen again on a retry."""
    if isinstance(exc, DensituneError):
        return True
    if isinstance(exc, ConnectionError | TimeoutError):
        return False
    if isinstance(exc, OSError):
        return exc.errno in _FATAL_ERRNOS
    return True  # MemoryError, a diverged loss, a bug: a retry repeats it


def one_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message`` (capped at ``limit`` characters)."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    if isinstance(exc, OSError) and exc.filename is not None and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, DensituneError):
        line = text or type(exc).__name__
    return line if len(line) <= limit else line[: limit - 1] + "…"


def fatal_report(exc: BaseException, metric: str) -> dict[str, Any]:
    """The last result of a trial that failed fatally (the metric NaN, so samplers skip it)."""
    return {FATAL_KEY: one_line(exc), metric: float("nan")}


def guarded(fn: Any, metric: str) -> Any:
    """Wrap a Tune function trainable: a fatal error is reported (:func:`fatal_report`), a
    transient one raised for Tune to retry. The wrapper keeps ``fn``'s signature, so
    ``tune.with_parameters`` still sees its parameters."""
    @functools.wraps(fn)
    def trainable(config: dict[str, Any], **kw: Any) -> None:
        try:
            fn(config, **kw)
        except Exception as exc:  # noqa: BLE001 - classified right here
            if not is_fatal(exc):
                raise
            from ray import tune

            # the whole traceback goes to the run's log file; the console gets one line (raise_fatal)
            logging.getLogger(__name__).error("fatal error in a trial, not retried: %s", one_line(exc), exc_info=exc)

            tune.report(fatal_report(exc, metric))

    return trainable


def fatal_stopper(gpus_per_trial: float = 0.0, max_gpu_hours: float | None = None) -> Any:
    """A Tune ``Stopper`` that ends the whole run at the first fatal trial result, or when the
    estimated GPU-hours (GPUs per trial × each trial's running time) reach ``max_gpu_hours``."""
    from ray import tune

    class FatalStop(tune.Stopper):
        def __init__(self) -> None:
            self.fatal: str | None = None
            self.seconds: dict[str, float] = {}

        def gpu_hours(self) -> float:
            return gpus_per_trial * sum(self.seconds.values()) / 3600.0

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            self.seconds[trial_id] = float(result.get("time_total_s") or 0.0)
            if result.get(FATAL_KEY):
                self.fatal = self.fatal or str(result[FATAL_KEY])
                return True
            return False

        def stop_all(self) -> bool:
            over = max_gpu_hours is not None and self.gpu_hours() >= max_gpu_hours
            return self.fatal is not None or over

    return FatalStop()


def raise_fatal(results: Any, what: str, name_key: str, error: type[DensituneError] = DensituneError) -> None:
    """After ``Tuner.fit``: raise the first fatal trial error as one line (exit 2 in the CLI).

    ``name_key`` is the trial config's key that names the trial (the network key, the grid point).
    """
    for r in results:
        msg = (r.metrics or {}).get(FATAL_KEY)
        if msg:
            if str(msg).startswith(PREFIX):  # the run folder cannot be written: that line says it all
                raise StorageError(str(msg))
            name = (r.config or {}).get(name_key, "?")
            raise error(f"{what} stopped at a trial that would fail again ({name}, not retried): {msg}")


def check_budget(stopper: Any, max_gpu_hours: float | None, command: str) -> None:
    """After ``Tuner.fit``: say so (one line, exit 2) when the GPU-hour budget stopped the run."""
    if max_gpu_hours is not None and stopper.gpu_hours() >= max_gpu_hours:
        raise DensituneError(f"--max-gpu-hours {max_gpu_hours:g} reached (about {stopper.gpu_hours():.3g} GPU-hours used); "
                             f"unfinished trials were stopped: rerun the same `densitune {command}` with --resume to continue")
