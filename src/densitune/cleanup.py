"""Leftovers of a run: the Ray processes of a driver that died, Tune's folders, cache lock files.

When densitune starts a local Ray for a run, it records in ``RUN/ray-session.json`` the
driver's pid, Ray's session folder and the pids of the Ray processes it started. After a
driver crash (``kill -9``, a lost terminal), :func:`clean_run` (``densitune clean RUN``, and
the next ``train``/``search`` on the same RUN) stops exactly those processes and their
children, found through ``/proc``: a process counts only if its command line names that
session's folder or it descends from one that does, so another Ray instance on the machine
is never touched. With no live driver it also removes Tune's experiment folders
(``RUN/tune/train-*``, ``RUN/tune/search-*``; resume reads the Parquet files and
``RUN/tune/state``, which stays) and the ``.lock`` files under ``RUN/cache``.

Standard library only (Linux ``/proc``); elsewhere the process part finds nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

SESSION_FILE = "ray-session.json"


def record_session(run_dir: str | Path) -> None:
    """Write ``RUN/ray-session.json`` for the Ray this process started (nothing when joined to a cluster)."""
    import ray

    node = getattr(ray._private.worker, "_global_node", None)  # set only when this process started Ray
    if node is None:
        return
    try:
        session_dir = node.get_session_dir_path()
        pids = sorted({info.process.pid for infos in node.all_processes.values() for info in infos if info.process})
    except Exception:  # noqa: BLE001 - Ray internals churn; without the record, clean finds nothing
        log.warning("could not record Ray's session for %s; `densitune clean` will not find its processes", run_dir)
        return
    path = Path(run_dir) / SESSION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{os.getpid()}-{SESSION_FILE}")
    tmp.write_text(json.dumps({"driver_pid": os.getpid(), "session_dir": session_dir, "pids": pids}))
    os.replace(tmp, path)


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _parents() -> dict[int, int]:
    out = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            stat = (d / "stat").read_text()
            out[int(d.name)] = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    state = Path(f"/proc/{pid}/stat")
    try:
        return state.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def session_processes(session_dir: str, recorded: list[int]) -> list[int]:
    """Live pids of one Ray session: those naming its folder, recorded ones still naming it, and their descendants."""
    parents = _parents()
    name = Path(session_dir).name
    roots = {pid for pid in parents if session_dir in _cmdline(pid) or (name and f"={name}" in _cmdline(pid))}
    roots |= {pid for pid in recorded if pid in parents and (session_dir in _cmdline(pid) or name in _cmdline(pid))}
    found = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    found.discard(os.getpid())
    return sorted(found)


@dataclass
class CleanReport:
    stopped: list[int] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    driver_alive: bool = False


def clean_run(run_dir: str | Path, *, prune: bool = True) -> CleanReport:
    """Stop the orphaned Ray processes of ``run_dir``'s dead driver; with ``prune``, remove Tune folders and cache locks."""
    run = Path(run_dir)
    report = CleanReport()
    record = run / SESSION_FILE
    if record.is_file():
        try:
            info = json.loads(record.read_text())
            driver, session_dir, pids = int(info["driver_pid"]), str(info["session_dir"]), [int(p) for p in info["pids"]]
        except (ValueError, KeyError, TypeError):
            log.warning("unreadable %s; no processes stopped", record)
        else:
            if driver == os.getpid():  # this process's own, live Ray (the demo's search after its training)
                return report
            report.driver_alive = _alive(driver) and "densitune" in _cmdline(driver)
            if not report.driver_alive:
                report.stopped = _stop(session_processes(session_dir, pids))
                record.unlink(missing_ok=True)
    if prune and not report.driver_alive:
        tune = run / "tune"
        for d in sorted(tune.glob("train-*")) + sorted(tune.glob("search-*")):
            if d.is_dir() and not d.is_symlink():
                shutil.rmtree(d)
                report.removed.append(str(d))
        for lock in sorted((run / "cache").rglob("*.lock")):
            lock.unlink(missing_ok=True)
            report.removed.append(str(lock))
    return report


def _stop(pids: list[int], wait_s: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL what is left after ``wait_s``; returns the pids signalled."""
    sent = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
            sent.append(pid)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and any(_alive(p) for p in sent):
        time.sleep(0.1)
    for pid in sent:
        if _alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return sent
