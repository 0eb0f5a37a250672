"""One writer per experiment: an exclusive lock on (run, experiment) that ``train`` and ``search`` take
before Ray starts.

The lock is a small JSON file, ``RUN/locks/<experiment>.json``, created with
``O_CREAT | O_EXCL`` (atomic on local disks and on NFSv3+), recording the holder's host,
pid, command and start time. It is released when the command exits, however it exits
(``with`` block). A lock left behind by a process that died without releasing it (SIGKILL,
a lost node) is taken over only when its holder is provably gone:

* same host: the recorded pid no longer exists;
* another host (a shared disk): the holder renews the file's modification time every
  :data:`RENEW_S` seconds from a background thread; a lock not renewed for :data:`LEASE_S`
  seconds has expired.

On an object store (``s3://``) the lock is an object created with a conditional PUT
(``If-None-Match: *``): of two writers exactly one creates it. The holder renews it every
:data:`RENEW_S` seconds by replacing exactly the version it wrote (``If-Match: <ETag>``); a lock
whose last renewal is older than :data:`LEASE_S` by the store's own clock (or whose holder ran on
this host and is gone) is taken over the same way, so two takers cannot both win, and the holder
deletes only its own version on exit.

A second writer while the holder lives exits 2 with one line naming the holder. Readers
(``report``, ``best``, ``query``, ``plot``) take no lock: they only skip temporary files.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from densitune.errors import DensituneError
from densitune.run.files import DocumentError, parse_document, read_document
from densitune.run.runstore import (
    ObjectLock,
    ObjectPath,
    RunPath,
    check_no_links,
    create_object,
    delete_object,
    location,
    read_object,
)

log = logging.getLogger(__name__)

#: Seconds between renewals of a held lock, and after which an unrenewed lock of another host has expired.
RENEW_S = 20.0
LEASE_S = 120.0


class LockedError(DensituneError):
    """Another live process writes the same experiment of the same run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _holder(path: Path) -> dict[str, Any] | None:

    try:
        return _checked(read_document(path))
    except FileNotFoundError:
        return None
    except DocumentError:
        return {}  # being written, or damaged: judged by its age alone


#: A pid in a lock file is only believed in Linux's range (a planted 2**70 is no pid).
_PID_RANGE = range(1, (1 << 22) + 1)


def _checked(info: Any) -> dict[str, Any]:
    """A lock file's record with the fields of the wrong type or range dropped (it is then judged by its age)."""
    if not isinstance(info, dict):
        return {}
    out = {k: v for k, v in info.items() if k in ("host", "command", "started_at") and isinstance(v, str)}
    if type(info.get("pid")) is int and info["pid"] in _PID_RANGE:
        out["pid"] = info["pid"]
    return out


def _stale(path: Path, info: dict[str, Any]) -> bool:
    """Whether the holder recorded in ``info`` is provably gone."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _alive(info["pid"])
    try:
        return time.time() - path.stat().st_mtime > LEASE_S
    except FileNotFoundError:
        return True


def _locked(experiment: str, run_dir: str | RunPath, info: dict[str, Any]) -> LockedError:
    return LockedError(f"experiment {experiment!r} of {run_dir} is being written by {_describe(info)}; "
                       "wait for it to finish, or use another --experiment")


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} "
            f"(`densitune {info.get('command', '?')}`, since {info.get('started_at', '?')})")


@contextmanager
def _renewed(renew_once: Callable[[], bool]) -> Iterator[None]:
    """Call ``renew_once`` every :data:`RENEW_S` seconds from a background thread while the block runs
    (until it returns False); the thread has stopped when the block is left."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(RENEW_S):
            if not renew_once():
                return

    renewer = threading.Thread(target=loop, name="densitune-lock-renewal", daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        renewer.join(timeout=5)


@contextmanager
def writer_lock(run_dir: str | RunPath, command: str, experiment: str) -> Iterator[RunPath]:
    """Hold the writer lock of (``run_dir``, ``experiment``) for the ``with`` block (``command`` is recorded).

    Raises:
        LockedError: a live process holds it (the message names host, pid, command and start).
    """
    root = location(run_dir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": f"{command} --experiment {experiment}",
          "started_at": datetime.now(UTC).isoformat(timespec="seconds")}
    if isinstance(root, ObjectPath):
        with _object_lock(root, experiment, me) as held:
            yield held
        return
    check_no_links(root, experiment)  # every writer takes this lock first: no write may leave the run
    folder = root / "locks"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{experiment}.json"
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = _holder(path)
            if info is None:
                continue  # released meanwhile: try again
            if not _stale(path, info):
                raise _locked(experiment, run_dir, info) from None
            log.warning("taking over the lock of %s from %s, which is gone", experiment, _describe(info))
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            json.dump(me, fh)
            fh.flush()
            os.fsync(fh.fileno())
        break
    else:
        raise LockedError(f"could not take the writer lock {path}; another process keeps taking it")

    def renew() -> bool:
        try:
            os.utime(path)
        except OSError:
            return False
        return True

    try:
        with _renewed(renew):
            yield path
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
            try:
                folder.rmdir()  # leave no empty locks/ folder behind
            except OSError:
                pass


@contextmanager
def _object_lock(root: ObjectPath, experiment: str, me: dict[str, Any]) -> Iterator[ObjectPath]:
    """The writer lock as an object (module docstring): conditional create, lease renewal, conditional delete."""

    path = root / "locks" / f"{experiment}.json"
    body = json.dumps(me).encode()
    held: ObjectLock | None = None
    for _ in range(5):
        held = create_object(path, body)
        if held is not None:
            break
        found = read_object(path)
        if found is None:
            continue  # released meanwhile: try again
        data, etag, age = found
        try:
            info = _checked(parse_document(data))
        except DocumentError:
            info = {}
        same_host = info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int)
        gone = (not _alive(info["pid"])) if same_host else age > LEASE_S
        if not gone:
            raise _locked(experiment, root, info)
        log.warning("taking over the lock of %s from %s, which is gone", experiment, _describe(info))
        held = create_object(path, body, replacing=etag)  # only if nobody renewed or took it meanwhile
        if held is not None:
            break
    if held is None:
        raise LockedError(f"could not take the writer lock {path}; another process keeps taking it")

    lock = held

    def renew() -> bool:
        try:
            renewed = create_object(path, body, replacing=lock.etag)
        except OSError as e:
            log.warning("could not renew the writer lock %s: %s", path, e)
            return True  # try again at the next renewal
        if renewed is None:
            log.error("lost the writer lock %s: another process took it over", path)
            return False
        lock.etag = renewed.etag
        return True

    try:
        with _renewed(renew):
            yield path
    finally:
        try:
            delete_object(lock)
        except OSError as e:
            log.warning("could not release the writer lock %s: %s", path, e)
