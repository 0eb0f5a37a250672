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

**Fencing.** The holder never writes after its lease may have lapsed: before each publish (the driver's
Optuna records and merged result files; each trial's rows, :class:`Fence`) it checks that its last
successful renewal, on the monotonic clock, is younger than the lease minus a margin
(:data:`MARGIN_FRACTION` of it); if not, it re-reads the lock. A lock that is gone or someone else's
(a pause past the lease, a GC pause or a frozen VM, let another host take over), or a lease the holder
could not renew in time (a stalled store), stops the command at once (:class:`LockLost`, one line, a
non-zero exit; the renewal thread interrupts the main thread the way Ctrl-C does), with nothing more
written. ``DENSITUNE_LOCK_LEASE_S`` shortens the lease (and the renewal period, a sixth of it) for tests.

A second writer while the holder lives exits 2 with one line naming the holder. Readers
(``report``, ``best``, ``query``, ``plot``) take no lock: they only skip temporary files.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from densitune.errors import DensituneError
from densitune.run.files import DocumentError, parse_document, read_document
from densitune.run.runstore import (
    ObjectLock,
    ObjectPath,
    RunPath,
    StoreStalled,
    bounded,
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
#: A test knob (README): a shorter lease, in seconds; renewals then come every sixth of it.
LEASE_ENV = "DENSITUNE_LOCK_LEASE_S"
#: The holder stops trusting its lease once its last renewal is older than the lease less this fraction of it.
MARGIN_FRACTION = 0.25


def lease_s() -> float:
    """The lease (``DENSITUNE_LOCK_LEASE_S``, else :data:`LEASE_S`)."""
    text = os.environ.get(LEASE_ENV, "").strip()
    try:
        return float(text) if text and float(text) > 0 else LEASE_S
    except ValueError:
        return LEASE_S


def renew_s() -> float:
    """Seconds between renewals: :data:`RENEW_S`, or a sixth of a shortened lease."""
    return max(0.5, min(RENEW_S, lease_s() / 6))


def trusted_s() -> float:
    """How long after its last renewal the holder trusts its lease without asking the store."""
    return max(lease_s(), 3.0) * (1 - MARGIN_FRACTION)


class LockedError(DensituneError):
    """Another live process writes the same experiment of the same run."""


class LockLost(DensituneError):
    """This process may no longer hold its writer lock: it stops without writing anything more."""


def _read_token(path: RunPath) -> tuple[str | None, float]:
    """``(token, age in seconds)`` of the lock at ``path`` (``(None, inf)`` when it is gone or unreadable)."""
    if isinstance(path, ObjectPath):
        found = read_object(path)
        if found is None:
            return None, float("inf")
        data, _etag, age = found
    else:
        try:
            data, age = path.read_bytes(), time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return None, float("inf")
    try:
        info = parse_document(data)
    except DocumentError:
        return None, float("inf")
    token = info.get("token") if isinstance(info, dict) else None
    return (token if isinstance(token, str) else None), age


@dataclass(frozen=True)
class Fence:
    """What a trial on any node needs to check, before it publishes, that its driver still holds the lock:
    the lock's location and the holder's random token (never a credential)."""

    lock: str
    token: str

    def check(self) -> None:
        """Raises:
            LockLost: the lock is gone, or another writer's."""
        token, _ = _read_token(location(self.lock))
        if token != self.token:
            raise LockLost(f"lost the writer lock {self.lock}: another process took it over; "
                           "this run stopped without writing more")


class HeldLock:
    """The writer lock this process holds: the fence check before each publish (module docstring)."""

    def __init__(self, path: RunPath, token: str) -> None:
        self.path, self.token = path, token
        self.renewed_at = time.monotonic()
        self.lost: str | None = None

    @property
    def fence(self) -> Fence:
        return Fence(str(self.path), self.token)

    def fresh(self) -> bool:
        """Whether the last successful renewal is recent enough to trust the lease without asking the store."""
        return time.monotonic() - self.renewed_at < trusted_s()

    def check(self) -> None:
        """The fence: return only while this process certainly holds the lock.

        Raises:
            LockLost: the lease may have lapsed and the lock is gone or someone else's (or cannot be read).
        """
        if self.lost is None and not self.fresh():
            t0 = time.monotonic()
            try:
                token, age = _read_token(self.path)
            except (OSError, DensituneError) as e:
                token, age = None, float("inf")
                self.lose(f"could not read the writer lock {self.path} to confirm it ({e})", interrupt=False)
            if token == self.token and age < trusted_s():
                self.renewed_at = t0 - age
            elif self.lost is None:
                self.lose(f"lost the writer lock {self.path}: another process took it over after this one paused "
                          f"past its {lease_s():g} s lease", interrupt=False)
        if self.lost is not None:
            raise LockLost(f"{self.lost}; this run stopped without writing more")

    def lose(self, why: str, *, interrupt: bool = True) -> None:
        """Mark the lock lost; from another thread, stop the main thread the way Ctrl-C does."""
        if self.lost is None:
            self.lost = why
            log.info("%s", why)  # the command says it in its one line
        if interrupt and threading.current_thread() is not threading.main_thread():
            signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)


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
    out = {k: v for k, v in info.items() if k in ("host", "command", "started_at", "token") and isinstance(v, str)}
    if type(info.get("pid")) is int and info["pid"] in _PID_RANGE:
        out["pid"] = info["pid"]
    return out


def _stale(path: Path, info: dict[str, Any]) -> bool:
    """Whether the holder recorded in ``info`` is provably gone."""
    if info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int):
        return not _alive(info["pid"])
    try:
        return time.time() - path.stat().st_mtime > lease_s()
    except FileNotFoundError:
        return True


def _locked(experiment: str, run_dir: str | RunPath, info: dict[str, Any]) -> LockedError:
    return LockedError(f"experiment {experiment!r} of {run_dir} is being written by {_describe(info)}; "
                       "wait for it to finish, or use another --experiment")


def _describe(info: dict[str, Any]) -> str:
    return (f"pid {info.get('pid', '?')} on {info.get('host', '?')} "
            f"(`densitune {info.get('command', '?')}`, since {info.get('started_at', '?')})")


@contextmanager
def _renewed(held: HeldLock, renew_once: Callable[[], bool | None]) -> Iterator[None]:
    """Call ``renew_once`` every :func:`renew_s` seconds from a background thread while the block runs; each
    call may take only what is left of the trusted lease. A renewal that returns False (the lock is someone
    else's), or none that succeeds before the lease may lapse, loses the lock (:meth:`HeldLock.lose`)."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(renew_s()):
            left = trusted_s() - (time.monotonic() - held.renewed_at)
            t0 = time.monotonic()
            try:
                # past the trusted lease (a pause) the conditional renewal may still prove the lock unchanged
                ok: bool | None = bounded(f"renewal of {held.path}", renew_once, budget=left if left > 0 else None,
                                          thread=True)
            except StoreStalled:
                ok = None
            if ok is False:
                held.lose(f"lost the writer lock {held.path}: another process took it over")
                return
            if ok:
                held.renewed_at = t0
            elif not held.fresh():
                held.lose(f"could not renew the writer lock {held.path} within its {lease_s():g} s lease (the store "
                          "did not answer): stopped, since another writer may take it over")
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
    """Hold the writer lock of (``run_dir``, ``experiment``) for the ``with`` block (``command`` is recorded);
    yields the lock's path (:func:`writer_lease` yields the :class:`HeldLock`, with its fence).

    Raises:
        LockedError: a live process holds it (the message names host, pid, command and start).
    """
    with writer_lease(run_dir, command, experiment) as held:
        yield held.path


@contextmanager
def writer_lease(run_dir: str | RunPath, command: str, experiment: str) -> Iterator[HeldLock]:
    """:func:`writer_lock`, yielding the :class:`HeldLock` (call ``held.check()`` before each publish)."""
    root = location(run_dir)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "command": f"{command} --experiment {experiment}",
          "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "token": secrets.token_hex(16)}
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

    held = HeldLock(path, str(me["token"]))

    def renew() -> bool | None:
        if (_holder(path) or {}).get("token") != me["token"]:
            return False
        try:
            os.utime(path)
        except OSError:
            return None
        return True

    try:
        with _renewed(held, renew):
            yield held
    finally:
        if (_holder(path) or {}).get("token") == me["token"]:
            path.unlink(missing_ok=True)
            try:
                folder.rmdir()  # leave no empty locks/ folder behind
            except OSError:
                pass


@contextmanager
def _object_lock(root: ObjectPath, experiment: str, me: dict[str, Any]) -> Iterator[HeldLock]:
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
        gone = (not _alive(info["pid"])) if same_host else age > lease_s()
        if not gone:
            raise _locked(experiment, root, info)
        log.warning("taking over the lock of %s from %s, which is gone", experiment, _describe(info))
        held = create_object(path, body, replacing=etag)  # only if nobody renewed or took it meanwhile
        if held is not None:
            break
    if held is None:
        raise LockedError(f"could not take the writer lock {path}; another process keeps taking it")

    lock, mine = held, HeldLock(path, str(me["token"]))

    def renew() -> bool | None:
        try:
            renewed = create_object(path, body, replacing=lock.etag)
        except OSError as e:
            log.warning("could not renew the writer lock %s: %s", path, e)
            return None  # try again at the next renewal, while the lease lasts
        if renewed is None:
            return False
        lock.etag = renewed.etag
        return True

    try:
        with _renewed(mine, renew):
            yield mine
    finally:
        if mine.lost is None:
            try:
                delete_object(lock)  # only the version this process wrote
            except (OSError, StoreStalled) as e:
                log.warning("could not release the writer lock %s: %s", path, e)
