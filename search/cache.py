"""A cross-process disk cache for features, fitted densities and attacked inputs.

Ray runs trials in several actor processes (and on several nodes): an in-memory
cache alone would extract the same features once per process. This cache keeps
each object in ``<root>/<kind>/<sha1>.pt``, as plain tensors and scalars (``encode``/``decode``
turn a cached object into such a structure and back), read back with ``weights_only=True``: a
file planted in a run folder is never unpickled into code. A file lock makes concurrent processes
wait for the first one to compute it instead of repeating the work. Every
computation is appended to ``<root>/events.log`` (one line: kind and key), which
is how tests and users can see that each thing was computed once.

Keys name a checkpoint by path, size and modification time, so a retrained model
never reuses stale features.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from densitune.checks import error_summary
from densitune.run.files import atomic_write, load_tensors
from densitune.run.runstore import location

log = logging.getLogger(__name__)
T = TypeVar("T")

EVENTS = "events.log"
#: Part of every key: bump when what is cached changes shape, so old files are not reused.
CACHE_VERSION = 2


def checkpoint_token(path: str) -> str:
    """Where the weights really are (a folder of links to them, as `densitune run` searches, shares their
    cache entries), plus their size and mtime: changes whenever the model does."""
    f = (location(path) / "model.pt").resolve()
    st = f.stat()
    return f"{f.parent}@{st.st_size}:{st.st_mtime_ns}"


class DiskCache:
    """``get_or_create(kind, key, make)``: load a cached object or compute, store and log it once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _path(self, kind: str, key: str) -> Path:
        return self.root / kind / f"{hashlib.sha1(f'v{CACHE_VERSION}|{key}'.encode()).hexdigest()}.pt"

    def _log_event(self, kind: str, key: str) -> None:
        line = f"{kind}\t{key}\n".encode()
        fd = os.open(self.root / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one small O_APPEND write: atomic between processes
        finally:
            os.close(fd)

    def get_or_create(
        self,
        kind: str,
        key: str,
        make: Callable[[], T],
        map_location: Any = "cpu",
        encode: Callable[[T], Any] = lambda obj: obj,
        decode: Callable[[Any], T] = lambda state: state,
    ) -> T:
        """The object cached under (kind, key), loaded onto ``map_location``; else ``make()``, stored and logged.

        ``encode(obj)`` must give tensors, scalars and containers of them (what ``weights_only=True``
        loads); ``decode`` rebuilds the object. A file that does not load that way (corrupt, stale,
        or a planted pickle) is reported in one warning line and recomputed; it is never executed.
        While another process computes the object, this call waits for it and then loads it.
        """
        got = self._get_or_create(kind, key, make, map_location, encode, decode, wait=True)
        if got is None:  # cannot happen: waiting for the lock always ends with the object
            raise RuntimeError(f"cache entry {kind} {key} not obtained")
        return got[0]

    def claim(
        self,
        kind: str,
        key: str,
        make: Callable[[], T],
        map_location: Any = "cpu",
        encode: Callable[[T], Any] = lambda obj: obj,
        decode: Callable[[Any], T] = lambda state: state,
    ) -> tuple[T] | None:
        """:meth:`get_or_create` without waiting: ``None`` when another process holds the entry (is computing
        it), so that concurrent processes can share a list of work, each computing what nobody has claimed yet."""
        return self._get_or_create(kind, key, make, map_location, encode, decode, wait=False)

    def _get_or_create(
        self,
        kind: str,
        key: str,
        make: Callable[[], T],
        map_location: Any,
        encode: Callable[[T], Any],
        decode: Callable[[Any], T],
        wait: bool,
    ) -> tuple[T] | None:
        path = self._path(kind, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                if path.exists():
                    try:
                        return (decode(load_tensors(path, map_location)),)
                    except Exception as e:  # noqa: BLE001 - any unreadable or stale cache file is recomputed
                        log.warning("cache file %s rejected (%s: %s); recomputing", path, type(e).__name__,
                                    error_summary(e))
                obj = make()
                state = encode(obj)
                atomic_write(path, lambda f: torch.save(state, f))
                self._log_event(kind, key)
                return (obj,)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def events(self) -> list[tuple[str, str]]:
        """Every (kind, key) computed so far, in order."""
        f = self.root / EVENTS
        if not f.exists():
            return []
        return [tuple(line.split("\t", 1)) for line in f.read_text().splitlines() if line]  # type: ignore[misc]
