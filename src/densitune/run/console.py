"""What a run prints: a header, one live progress bar, warnings, a short summary; details go to a log file.

By default the console shows only what a person needs while a run goes on; every
per-epoch and per-trial line goes to ``RUN/densitune.log`` (the driver and every Ray
worker append to it). ``--verbose`` puts those lines and Ray Tune's own output on the
console as well.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from densitune.errors import STORAGE_PREFIX, StorageError

log = logging.getLogger("densitune")

LOG_NAME = "densitune.log"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class Interrupted(Exception):
    """A run stopped before it finished (Ctrl-C, SIGTERM): the message says what finished and how to go on.

    The command exits with :attr:`exit_code`: 130 for SIGINT, 143 for SIGTERM, as a shell reports them.
    """

    exit_code = 130

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM (what ``ray job stop``, ``timeout``, batch schedulers and Kubernetes send), raised where Ctrl-C's
    KeyboardInterrupt would be, so a run ends the same way: the honest account, the ``--resume`` hint; exit 143."""

    exit_code = 143


def terminated(stop: BaseException) -> bool:
    """Whether the KeyboardInterrupt ``stop`` came from SIGTERM. Ray's core worker turns an exception raised by a
    signal handler during one of its calls (``ray.wait``) into a KeyboardInterrupt of its own, so the handler also
    leaves a mark the kernel keeps: it ignores further SIGTERMs (one is enough; SIGKILL may follow)."""
    seen: set[int] = set()
    e: BaseException | None = stop
    while e is not None and id(e) not in seen:
        if isinstance(e, Terminated):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return signal.getsignal(signal.SIGTERM) is signal.SIG_IGN


def _raise_terminated(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the mark :func:`terminated` reads
    raise Terminated()


def sigterm_as_interrupt() -> None:
    """From now on SIGTERM raises :class:`Terminated` in this (main) thread. Called when a command starts and
    again after Ray has started (``ray.init`` installs its own handler)."""

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_terminated)


def resume_command(argv: Sequence[str]) -> str:
    """The command line that continues an interrupted run: ``argv`` with ``--resume`` added once."""
    args = list(argv)
    if "--resume" not in args:
        args.append("--resume")
    return "densitune " + shlex.join(args)


def setup_logging(*, quiet: bool = False, verbose: bool = False) -> None:
    """Console logging: warnings (and errors) only, INFO too with ``verbose``."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_densitune", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.INFO if verbose else logging.WARNING)
    handler.setFormatter(logging.Formatter(_FORMAT if verbose else "densitune: %(levelname)s: %(message)s", datefmt="%H:%M:%S"))
    handler._densitune = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("densitune").setLevel(logging.INFO)
    del quiet  # -q: no header, no progress bar (see Progress); warnings still show


class _RunLogHandler(logging.FileHandler):
    """The run's log file. A line it cannot write (a full disk, a vanished mount) is dropped without logging's
    traceback on the console: the write that fails in the run itself is reported, once, in one line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        pass

    def _open(self) -> Any:
        """Opened for append without following a link (a run folder is untrusted input)."""
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)


def log_to_file(path: str | Path | None) -> None:
    """Append every ``densitune`` INFO line of this process to ``path`` (once per path and process).

    Called by the driver and by each Ray worker that runs a trial, so per-epoch and
    per-trial lines land in the run's log file instead of on the console.
    """
    if path is None:
        return
    path = str(Path(path))
    logger = logging.getLogger("densitune")
    if any(getattr(h, "baseFilename", None) == path for h in logger.handlers):
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        handler = _RunLogHandler(path, encoding="utf-8")  # opened for append: lines from many processes interleave whole
    except OSError as e:

        why = "a symbolic link: densitune writes only inside the run" if Path(path).is_symlink() else (
            e.strerror or type(e).__name__)
        raise StorageError(f"{STORAGE_PREFIX} {path}: {why}") from None
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


def quiet_ray(verbose: bool) -> None:
    """Environment for Ray Tune set before it runs: its own console output only with ``verbose``.

    * ``RAY_AIR_NEW_OUTPUT=0``: the classic reporter, which prints nothing at ``verbose=0``
      (the new one prints a configuration box and a TensorBoard hint at any verbosity);
    * ``TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S=0``: no "Experiment state
      snapshotting" warnings (a training checkpoint every epoch triggers them);
    * Tune's own log lines (warnings, a failed trial's traceback) go to the run's log file only;
    * ``TUNE_DISABLE_SIGINT_HANDLER=1``: Ctrl-C raises KeyboardInterrupt in the driver instead of
      Tune's graceful stop, which returns as if the run had finished and advises
      ``Tuner.restore``; densitune's own records (Parquet rows, per-epoch state) resume the run.
    """
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
        # Tune's warnings and errors (a failed trial's traceback) go to the run's log file, not the
        # console: the command's own one-line error names the failure.
        files = [h for h in logging.getLogger("densitune").handlers if isinstance(h, logging.FileHandler)]
        for name in ("ray.tune", "ray.train", "ray.air"):
            logger = logging.getLogger(name)
            logger.setLevel(logging.WARNING)
            logger.propagate = False
            for h in files:
                if h not in logger.handlers:
                    logger.addHandler(h)


#: Seconds trials may wait with none running before the bar is redrawn to say what they wait for
#: (``DENSITUNE_WAIT_NOTICE_S`` in the environment overrides it).
STUCK_AFTER_S = 10.0


def _wait_notice_s() -> float:
    try:
        return float(os.environ.get("DENSITUNE_WAIT_NOTICE_S") or STUCK_AFTER_S)
    except ValueError:
        return STUCK_AFTER_S


class Progress:
    """One live progress bar (tqdm on stderr) for a run of ``total`` trials.

    Shows done / running / failed, the best value so far and the ETA. It redraws when a
    twentieth of the trials more have finished, when a trial fails, and at the end, so a
    long run adds a bounded number of lines to a terminal or a captured log.

    "running" is Tune's count of RUNNING trials (:meth:`observe`, after every step of Tune's loop). A finished
    trial's redraw waits until Tune has started the trials that take its place (the count is back at its peak,
    or at the trials left), at most :attr:`REFILL_WAIT` seconds: drawn at the finish, the bar would always show
    one running fewer than run (a finished trial leaves RUNNING a step before the next one enters it).
    """

    #: Longest a due redraw waits for the next trial to start (s): resources may have gone, the searcher may wait.
    REFILL_WAIT = 30.0

    def __init__(self, total: int, what: str, metric: str, mode: str, *, enabled: bool = True) -> None:
        self.total, self.what, self.metric, self.mode = total, what, metric, mode
        self.done = self.failed = self.running = self.peak = 0
        self.waiting = ""  # trials that wait for resources, and one trial's demand ("2 waiting for 1 CPU, 1 GPU each")
        self.best: tuple[float, str] | None = None
        self.t0 = time.monotonic()
        self._step = max(1, total // 20)
        self._drawn = 0
        self._due: float | None = None  # when a redraw became due (monotonic s), None if none is
        self._stuck_since: float | None = None  # since when trials wait while none runs
        self._stuck_drawn = False
        self._bar: Any = None
        if enabled and total > 0:
            from tqdm import tqdm

            # A fixed size: a terminal that reports 0 x 0 (a fresh pseudo-terminal) would hide the bar.
            width = shutil.get_terminal_size((100, 20)).columns
            self._bar = tqdm(total=total, desc=what, unit="trial", file=sys.stderr, ncols=min(max(width, 60), 160), nrows=20,
                             mininterval=0, miniters=self._step, smoothing=0, leave=True, maxinterval=1e9,
                             bar_format="{desc} |{bar:20}| {n}/{total} done{postfix} [{elapsed}<{remaining}]")
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            _OPEN.append(self)

    def __getstate__(self) -> dict[str, Any]:
        """Tune pickles its callbacks with the experiment state: the bar (a terminal) stays behind."""
        return {**self.__dict__, "_bar": None}

    def _postfix(self) -> str:
        best = f"best {self.metric} {self.best[0]:.4f}" if self.best else "no result yet"
        waiting = f"{self.waiting}, " if self.waiting else ""
        return f"{self.running} running, {waiting}{self.failed} failed; {best}"

    def finished(self, value: float | None, label: str, *, failed: bool = False) -> None:
        """One trial ended (``value`` its metric, None when it reported none); a redraw may become due."""
        self.done += 1
        self.failed += int(failed)
        if value is not None and not failed:
            better = self.best is None or (value > self.best[0] if self.mode == "max" else value < self.best[0])
            if better:
                self.best = (float(value), label)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        best = f"best {self.metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
        log.info("%s %d/%d done, %d running, %d failed; %s; elapsed %.0fs, ETA %.0fs%s", self.what, self.done, self.total,
                 max(self.running - 1, 0), self.failed, best, elapsed, eta, f" ({label} FAILED)" if failed else "")
        if self._due is None and self.done < self.total and (failed or self.done - self._drawn >= self._step):
            self._due = time.monotonic()  # close() draws the last

    def observe(self, running: int) -> None:
        """Tune's RUNNING trials now (after a step of its loop); draws a due redraw once the pool is refilled."""
        self.running, self.peak = running, max(self.peak, running)
        if self._bar is None:
            return
        self._bar.set_postfix_str(self._postfix(), refresh=False)
        refilled = running >= min(self.peak, self.total - self.done)
        if self._due is not None and (refilled or time.monotonic() - self._due >= self.REFILL_WAIT):
            self._bar.n = self.done
            self._bar.refresh()
            self._drawn, self._due = self.done, None

    def pending(self, count: int, demand: dict[str, float], now: float | None = None) -> None:
        """``count`` trials wait for their resources (``demand``: one trial's request); shown in the bar. When trials
        have waited :data:`STUCK_AFTER_S` with none running (an autoscaler starting a node, a busy cluster), the bar is
        redrawn once and the log says so: "0 running" then says what the run waits for."""
        text = f"{count} waiting for " + ", ".join(f"{v:g} {k}" for k, v in demand.items() if v > 0) + " each" if count else ""
        now = time.monotonic() if now is None else now
        if not count or self.running:
            self._stuck_since = None
        elif self._stuck_since is None:
            self._stuck_since = now
        redraw = self._stuck_since is not None and now - self._stuck_since >= _wait_notice_s() and not self._stuck_drawn
        self._stuck_drawn = (self._stuck_drawn or redraw) and self._stuck_since is not None
        if text == self.waiting and not redraw:
            return
        self.waiting = text
        if redraw:
            log.info("%s: 0 running, %s", self.what, text)
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(), refresh=False)
            if redraw:
                self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.n = self.done
            self._bar.close()
            self._bar = None
        if self in _OPEN:
            _OPEN.remove(self)


_OPEN: list[Progress] = []


def close_progress() -> None:
    """Close every open progress bar (before an error or interruption message is printed)."""
    for p in list(_OPEN):
        p.close()


def progress_callback(progress: Progress, metric: str):
    """A Tune callback feeding ``progress`` as trials finish or fail."""
    from ray.tune import Callback

    class _Progress(Callback):
        def _done(self, trials, trial, failed: bool) -> None:
            value = (trial.last_result or {}).get(metric)
            label = str(trial.config.get("point") or trial.config.get("key") or trial.trial_id)
            progress.finished(value, label, failed=failed)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._done(trials, trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._done(trials, trial, failed=True)

        def on_step_end(self, iteration, trials, **info):  # trial statuses are settled between steps
            waiting = [t for t in trials if t.status == "PENDING"]  # first: observe() may draw the bar, with both
            progress.pending(len(waiting), dict(waiting[0].placement_group_factory.required_resources) if waiting else {})
            progress.observe(sum(t.status == "RUNNING" for t in trials))

        def on_experiment_end(self, trials, **info):
            progress.close()

    return _Progress()
