"""Leftovers of a run: the Ray processes of a driver that died, Tune's folders, cache lock files.

When densitune starts a local Ray for a run, it first puts a fresh random marker in its own environment
(:data:`MARKER_ENV`; every process Ray starts inherits it) and then records in ``RUN/ray-session.json``
the marker, its user id, the driver's pid and start time, and the pid and start time of each Ray process
it started. After a driver crash (``kill -9``, a lost terminal), :func:`clean_run` (``densitune clean RUN``,
and the next ``train``/``search`` on the same RUN) stops the processes that file *proves* to be that
session's, and nothing else.

A run folder is untrusted input (it sits on storage that many nodes and people write), so a process is
signalled only when all of these hold (:func:`session_processes`):

* it is a recorded process whose pid *and* start time (``/proc/PID/stat``) match the record, or a
  descendant of one;
* it runs as this user (real and effective uid), the user the record names;
* its environment holds the session's marker, exactly (``/proc/PID/environ``), which densitune itself put there;
* it is not PID 1, this process or one of its ancestors.

A command-line substring never counts. A session file that is not one densitune wrote (bad JSON, wrong
types, no marker, another user, PID 1, a pid out of range...) is reported in one line and ignored
(:class:`SessionFileError`). Signals go through a pidfd opened *before* the last check, so a pid reused
between the check and the signal is never hit.

With no live driver, pruning also removes Tune's experiment folders (``RUN/tune/train-*``,
``RUN/tune/search-*``; resume reads the Parquet files and ``RUN/tune/state``, which stays) and the
``.lock`` files under ``RUN/cache``.

Standard library only (Linux ``/proc``); elsewhere the process part finds nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densitune.run.files import DocumentError, atomic_write, read_document
from densitune.run.storage import fatal_storage

log = logging.getLogger(__name__)

SESSION_FILE = "ray-session.json"
#: The environment variable that carries a session's marker into every process its Ray starts.
MARKER_ENV = "DENSITUNE_SESSION"
SESSION_FORMAT = "densitune-ray-session"
SESSION_VERSION = 2
_MARKER = re.compile(r"[0-9a-f]{32}")
_MAX_BYTES = 1 << 20  # a session file is a few hundred bytes; a large one is not ours
_MAX_PROCESSES = 4096
_PID_MAX = 1 << 22  # Linux's largest pid_max


class SessionFileError(ValueError):
    """A session file that does not prove anything: it is ignored, and no process is signalled."""


def new_session_marker() -> str:
    """A fresh marker in this process's environment, inherited by every process started after this call
    (call it right before starting a local Ray)."""
    marker = secrets.token_hex(16)
    os.environ[MARKER_ENV] = marker
    return marker


@dataclass(frozen=True)
class ProcessId:
    """A process as the kernel identifies it over time: its pid and its start time (clock ticks after boot)."""

    pid: int
    start: int


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a live, non-zombie process, or None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[1]), int(fields[19])) if fields[0] != "Z" else None
    except (OSError, ValueError, IndexError):
        return None


def _uids(pid: int) -> tuple[int, ...]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return tuple(int(u) for u in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def _has_marker(pid: int, marker: str) -> bool:
    try:
        return f"{MARKER_ENV}={marker}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def process_id(pid: int) -> ProcessId | None:
    stat = _stat(pid)
    return ProcessId(pid, stat[1]) if stat else None


def _ancestors() -> set[int]:
    """This process, its parents up to PID 1, and PID 0/1 themselves: never signalled."""
    out, pid = {0, 1}, os.getpid()
    while pid > 1 and pid not in out:
        out.add(pid)
        stat = _stat(pid)
        pid = stat[0] if stat else 0
    return out


def _int(value: Any, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value < hi:
        raise SessionFileError(f"{what} is not a whole number in [{lo}, {hi})")
    return value


def _process(value: Any, what: str) -> ProcessId:
    if not isinstance(value, dict) or set(value) != {"pid", "start"}:
        raise SessionFileError(f"{what} is not {{pid, start}}")
    return ProcessId(_int(value["pid"], f"{what}.pid", 2, _PID_MAX + 1), _int(value["start"], f"{what}.start", 0, 1 << 63))


@dataclass(frozen=True)
class SessionRecord:
    """What ``RUN/ray-session.json`` holds, checked: see :func:`read_session`."""

    marker: str
    uid: int
    driver: ProcessId
    processes: tuple[ProcessId, ...]
    session_dir: str = ""


def parse_session(info: Any) -> SessionRecord:
    """A session record from the decoded JSON of a session file.

    Raises:
        SessionFileError: anything densitune would not have written, or a record of another user.
    """
    if not isinstance(info, dict) or info.get("format") != SESSION_FORMAT or info.get("version") != SESSION_VERSION:
        raise SessionFileError(f"not a version-{SESSION_VERSION} {SESSION_FORMAT} record")
    marker = info.get("marker")
    if not isinstance(marker, str) or not _MARKER.fullmatch(marker):
        raise SessionFileError("no valid session marker")
    uid = _int(info.get("uid"), "uid", 0, 1 << 32)
    if uid != os.getuid():
        raise SessionFileError(f"it names user {uid}, not this user ({os.getuid()})")
    procs = info.get("processes")
    if not isinstance(procs, list) or len(procs) > _MAX_PROCESSES:
        raise SessionFileError(f"processes is not a list of at most {_MAX_PROCESSES}")
    session_dir = info.get("session_dir", "")
    if not isinstance(session_dir, str) or len(session_dir) > 4096:
        raise SessionFileError("session_dir is not a path")
    return SessionRecord(marker, uid, _process(info.get("driver"), "driver"),
                         tuple(_process(p, f"processes[{i}]") for i, p in enumerate(procs)), session_dir)


def read_session(path: str | Path) -> SessionRecord | None:
    """The record in a session file, or None when there is none.

    Raises:
        SessionFileError: the file is unreadable, too large, not UTF-8 JSON, or not a record (:func:`parse_session`).
    """

    try:
        info = read_document(path, max_bytes=_MAX_BYTES)
    except FileNotFoundError:
        return None
    except DocumentError as e:
        raise SessionFileError(str(e)) from None
    return parse_session(info)


def _proven(proc: ProcessId, record: SessionRecord, excluded: set[int]) -> bool:
    """``proc`` is alive with that start time, runs as the record's user and carries its marker."""
    return (proc.pid not in excluded and process_id(proc.pid) == proc
            and all(u == record.uid for u in _uids(proc.pid)) and bool(_uids(proc.pid))
            and _has_marker(proc.pid, record.marker))


def driver_alive(record: SessionRecord) -> bool:
    """The recorded driver still runs (same pid, same start time, same user)."""
    d = record.driver
    return process_id(d.pid) == d and bool(_uids(d.pid)) and all(u == record.uid for u in _uids(d.pid))


def session_processes(record: SessionRecord) -> list[ProcessId]:
    """The live processes this record proves to be its session's: recorded ones proven by pid, start time,
    user and marker, and their descendants that run as that user and carry the marker too. Never PID 1,
    this process or its ancestors."""
    excluded = _ancestors()
    found = {p.pid: p for p in record.processes if _proven(p, record, excluded)}
    children: dict[int, list[int]] = {}
    for d in Path("/proc").glob("[0-9]*"):
        stat = _stat(int(d.name))
        if stat:
            children.setdefault(stat[0], []).append(int(d.name))
    todo = list(found)
    while todo:
        for child in children.get(todo.pop(), []):
            proc = process_id(child)
            if child not in found and proc and _proven(proc, record, excluded):
                found[child] = proc
                todo.append(child)
    return sorted(found.values(), key=lambda p: p.pid)


def record_session(run_dir: str | Path) -> None:
    """Write ``RUN/ray-session.json`` for the Ray this process started (nothing when joined to a cluster)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # set only when this process started Ray
    marker = os.environ.get(MARKER_ENV, "")
    if node is None:
        return
    me = process_id(os.getpid())
    try:
        session_dir = node.get_session_dir_path()
        pids = sorted({info.process.pid for infos in node.all_processes.values() for info in infos if info.process})
    except Exception:  # noqa: BLE001 - Ray internals churn; without the record, clean finds nothing
        pids, session_dir = [], None
    procs = [p for p in map(process_id, pids) if p is not None]
    if session_dir is None or not _MARKER.fullmatch(marker) or me is None:
        log.warning("could not record Ray's session for %s; `densitune clean` will not find its processes", run_dir)
        return

    path = Path(run_dir) / SESSION_FILE
    with fatal_storage(run_dir):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({
            "format": SESSION_FORMAT, "version": SESSION_VERSION, "marker": marker, "uid": os.getuid(),
            "session_dir": session_dir, "driver": vars(me), "processes": [vars(p) for p in procs]}))


def _alive(pid: int) -> bool:
    return _stat(pid) is not None


@dataclass
class CleanReport:
    stopped: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    driver_alive: bool = False
    #: Why the session file was ignored (it proves nothing), or None.
    ignored: str | None = None


def clean_run(run_dir: str | Path, *, prune: bool = True) -> CleanReport:
    """Stop the orphaned Ray processes of ``run_dir``'s dead driver; with ``prune``, remove Tune folders and cache locks.

    A session file that proves nothing (:class:`SessionFileError`) is ignored: ``report.ignored`` says why
    (the caller reports it in one line), and nothing is signalled or pruned.
    """
    run = Path(run_dir)
    report = CleanReport()
    record_path = run / SESSION_FILE
    try:
        record = read_session(record_path)
    except SessionFileError as e:
        report.ignored = f"{record_path}: {e}"
        return report
    if record is not None:
        if record.driver.pid == os.getpid() and driver_alive(record):  # this process's own, live Ray (the demo)
            return report
        report.driver_alive = driver_alive(record)
        if not report.driver_alive:
            report.stopped = _stop(session_processes(record))
            record_path.unlink(missing_ok=True)
    if prune and not report.driver_alive:
        tune = run / "tune"
        for d in sorted(tune.glob("train-*")) + sorted(tune.glob("search-*")):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)
                report.removed.append(str(d))
        for lock in sorted((run / "cache").rglob("*.lock")):
            if not lock.is_symlink() and lock.is_file():
                lock.unlink(missing_ok=True)
                report.removed.append(str(lock))
    return report


def _signal(proc: ProcessId, sig: int) -> bool:
    """Send ``sig`` to exactly ``proc``: through a pidfd opened before its start time is checked once more,
    so a pid reused in between is never hit. False when it is gone (or was never it)."""
    try:
        fd = os.pidfd_open(proc.pid)
    except (ProcessLookupError, AttributeError, OSError):
        return False
    try:
        if process_id(proc.pid) != proc:
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except (ProcessLookupError, OSError):
        return False
    finally:
        os.close(fd)


def _stop(procs: list[ProcessId], wait_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``wait_s``; returns the pids signalled."""
    sent = [p for p in procs if _signal(p, signal.SIGTERM)]
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(process_id(p.pid) == p for p in sent):
        time.sleep(0.1)
    for p in sent:
        _signal(p, signal.SIGKILL)
    return [p.pid for p in sent]
