"""The run store: one run folder, on a local disk or in a bucket, and the one way to read and write it.

A run is named by a local path (``runs/demo``, ``file:///data/runs/demo``) or by an object-store
URI (``s3://bucket/runs/demo``; ``gs://`` reads through the same code where ``pyarrow`` has it).
Every writer and reader of a run's files goes through :func:`location`, which gives a
:class:`pathlib.Path` for a local run and an :class:`ObjectPath` (the few ``Path`` operations the
run store needs, over :mod:`pyarrow.fs`) for a bucket, and through :func:`publish` / :func:`read_bytes`:

* local publishing: a temporary name beside the file, fsync, rename, fsync of the folder
  (:func:`densitune.run.files.atomic_write`);
* object stores: a single PUT of the finished object, which readers see whole or not at all.

Credentials come from the environment and the standard AWS configuration only (``AWS_ACCESS_KEY_ID``,
``AWS_PROFILE``, an instance role, ``AWS_ENDPOINT_URL`` for an S3-compatible server); they are never
stored in a run, a row, a log line or an error message. Throttled or dropped requests are retried with
backoff by the S3 client (:data:`S3_ATTEMPTS` attempts), which is the store's part of the retry policy
(:mod:`densitune.run.failures`).

Every request is bounded: a connect and a response timeout of :func:`storage_timeout` seconds
(``--storage-timeout``, ``DENSITUNE_STORAGE_TIMEOUT``; default :data:`DEFAULT_TIMEOUT_S`, which tolerates
responses of several seconds), :data:`S3_ATTEMPTS` attempts, so one call gives up after about
:func:`call_budget` seconds with :class:`StoreStalled`, one line naming the operation and the endpoint.
Calls made on the main thread run on a helper thread while the main thread waits interruptibly, so the
first Ctrl-C ends a command even inside a stuck call.

Layout of a run (:class:`RunStore`)::

    RUN/models/<experiment>/<network key>/   final weights (model.pt, config.json)
    RUN/results/experiment=<name>/*.parquet  result rows (densitune.results.store)
    RUN/tune/                                Ray Tune's experiment state and per-epoch training state
    RUN/locks/<experiment>.json              the writer lock (densitune.run.runlock)
    RUN/optuna/<experiment>/                 each search's Optuna study (densitune.search.optuna_study)
    RUN/cache/, RUN/densitune.log, RUN/ray-session.json, RUN/plots/

For a run in a bucket, the node-local parts (the disk cache, the log file, the Ray session record)
live in the machine's temporary folder instead (:meth:`RunStore.local`): they describe one
machine's processes and speed up one machine's trials.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import math
import os
import posixpath
import re
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any, BinaryIO, TypeVar

from densitune.errors import STORAGE_PREFIX as PREFIX
from densitune.errors import ConfigError, StorageError
from densitune.run.console import LOG_NAME
from densitune.run.files import atomic_write

__all__ = ["ObjectPath", "RunPath", "RunStore", "is_remote", "location", "publish", "arrow_files", "arrow_file",
           "files_under"]

#: Attempts per S3 request (throttling, dropped connections, timeouts) before an error is raised.
S3_ATTEMPTS = 4
REMOTE_SCHEMES = ("s3", "gs", "gcs")
#: Where the per-request timeout is read from (``--storage-timeout`` sets it for the command and its workers).
TIMEOUT_ENV = "DENSITUNE_STORAGE_TIMEOUT"
#: Seconds a storage request may take to connect, and to answer, before it is retried.
DEFAULT_TIMEOUT_S = 30.0

T = TypeVar("T")
#: The name of the helper thread of a storage call made on the main thread (:func:`bounded`).
CALL_THREAD = "densitune-storage-call"


class StoreStalled(StorageError):
    """A storage call that got no answer within its budget (timeouts x attempts): one line naming the call."""


def storage_timeout() -> float:
    """Seconds one storage request may take (:data:`TIMEOUT_ENV`, else :data:`DEFAULT_TIMEOUT_S`).

    Raises:
        ConfigError: the variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"{TIMEOUT_ENV} / --storage-timeout must be a positive number of seconds, not {text[:40]!r}")
    return value


def use_storage_timeout(seconds: float | None) -> None:
    """``--storage-timeout``: this process and the Ray workers it starts use ``seconds`` per request.

    Raises:
        ConfigError: not a positive number.
    """
    if seconds is not None:
        os.environ[TIMEOUT_ENV] = repr(float(seconds))
    storage_timeout()  # checked before anything runs


def call_budget() -> float:
    """Seconds after which one storage call, with all its attempts and their backoff, has certainly given up."""
    return storage_timeout() * S3_ATTEMPTS + 2.0 * S3_ATTEMPTS + 5.0


def endpoint() -> str:
    """The object store's endpoint as the user configured it (no credentials are part of it)."""
    return os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def bounded(what: str, call: Callable[[], T], *, budget: float | None = None, thread: bool = False) -> T:
    """``call()``, which talks to the object store, given at most ``budget`` seconds (:func:`call_budget`).

    On the main thread the call runs on a daemon helper thread while the main thread waits: the wait is
    interruptible, so Ctrl-C (KeyboardInterrupt) ends it at once even when the store does not answer.
    Elsewhere it runs in place (the client's own timeouts and attempts bound it), unless ``thread`` asks for
    the helper thread there too (a caller that must not wait past ``budget``).

    Raises:
        StoreStalled: no answer within the budget (``what`` names the operation and the object).
    """
    limit = call_budget() if budget is None else budget
    if not thread and threading.current_thread() is not threading.main_thread():
        return call()
    box: dict[str, Any] = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting thread
            box["error"] = e
        done.set()

    threading.Thread(target=run, name=CALL_THREAD, daemon=True).start()
    if not done.wait(limit):
        raise StoreStalled(stalled(what, limit))
    if "error" in box:
        raise box["error"]
    return box["value"]


def stuck_calls() -> int:
    """How many storage calls of :func:`bounded` were given up (stalled, or left at Ctrl-C) and still hang."""
    return sum(1 for t in threading.enumerate() if t.name == CALL_THREAD and t.is_alive())


def stalled(what: str, seconds: float) -> str:
    """The one line of a storage call that got no answer in time."""
    return (f"storage stalled: the object store at {endpoint()} did not answer {what} within {seconds:.0f} s "
            f"({S3_ATTEMPTS} attempts of --storage-timeout {storage_timeout():g} s)")


def is_remote(uri: str | os.PathLike[str] | ObjectPath) -> bool:
    """Whether ``uri`` names an object store (``s3://``, ``gs://``) rather than a local path."""
    return isinstance(uri, ObjectPath) or (isinstance(uri, str) and uri.split("://", 1)[0] in REMOTE_SCHEMES and "://" in uri)


def _filesystem(scheme: str, bucket: str) -> Any:
    """The ``pyarrow.fs`` file system of a bucket, with the timeouts of :func:`storage_timeout` (one per value)."""
    return _cached_filesystem(scheme, bucket, storage_timeout())


@functools.lru_cache(maxsize=16)
def _cached_filesystem(scheme: str, bucket: str, timeout: float) -> Any:
    import pyarrow.fs as pafs

    if scheme == "s3":
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if not region and not os.environ.get("AWS_ENDPOINT_URL"):
            try:
                region = pafs.resolve_s3_region(bucket)
            except OSError:
                region = None
        # request_timeout also bounds a slow answer: without it the AWS SDK gives up on a response slower than ~3 s
        kwargs: dict[str, Any] = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_ATTEMPTS),
                                  "connect_timeout": timeout, "request_timeout": timeout,
                                  # a small object is then one PutObject, not a multipart upload's three requests
                                  "allow_delayed_open": True}
        if region:
            kwargs["region"] = region
        if os.environ.get("AWS_ENDPOINT_URL"):
            kwargs["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
        return pafs.S3FileSystem(**kwargs)
    fs, _ = pafs.FileSystem.from_uri(f"{scheme}://{bucket}")
    return fs


_filesystem.cache_clear = _cached_filesystem.cache_clear  # type: ignore[attr-defined]


class ObjectPath:
    """A key in a bucket, with the ``pathlib.Path`` operations the run store uses (``/``, ``glob``,
    ``read_bytes``, ``is_file``, ``unlink``...). Folders are key prefixes: ``mkdir`` does nothing."""

    def __init__(self, uri: str) -> None:
        scheme, rest = uri.split("://", 1)
        key = posixpath.normpath("/" + rest).lstrip("/")
        if not key or key == ".":
            raise ConfigError(f"{uri}: name a bucket (and a folder in it), e.g. {scheme}://bucket/runs/demo")
        self.scheme, self.key = scheme, key

    # -- names
    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, other: str | PurePosixPath) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{self.key}/{other}")

    @property
    def fs(self) -> Any:
        """The ``pyarrow.fs`` file system of this path's bucket."""
        return _filesystem(self.scheme, self.bucket)

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.key).suffix

    @property
    def stem(self) -> str:
        return PurePosixPath(self.key).stem

    @property
    def parent(self) -> ObjectPath:
        parent = posixpath.dirname(self.key)
        return ObjectPath(f"{self.scheme}://{parent}") if parent else self

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def with_suffix(self, suffix: str) -> ObjectPath:
        return self.with_name(self.stem + suffix)

    def relative_to(self, other: ObjectPath) -> PurePosixPath:
        return PurePosixPath(self.key).relative_to(other.key)

    def resolve(self) -> ObjectPath:
        return self

    def expanduser(self) -> ObjectPath:
        return self

    # -- queries
    def _info(self) -> Any:
        return bounded(f"HEAD {self}", lambda: self.fs.get_file_info(self.key))

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type != pafs.FileType.NotFound)

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type == pafs.FileType.File)

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return bool(self._info().type == pafs.FileType.Directory)

    def stat(self) -> SimpleNamespace:
        info = self._info()
        mtime_ns = int(info.mtime_ns or 0)
        return SimpleNamespace(st_size=int(info.size or 0), st_mtime=mtime_ns / 1e9, st_mtime_ns=mtime_ns)

    def _walk(self, recursive: bool) -> Iterator[tuple[ObjectPath, bool]]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.key, recursive=recursive, allow_not_found=True)
        for info in bounded(f"LIST {self}", lambda: list(self.fs.get_file_info(selector))):
            yield ObjectPath(f"{self.scheme}://{info.path}"), info.type == pafs.FileType.Directory

    def iterdir(self) -> Iterator[ObjectPath]:
        return (p for p, _ in self._walk(False))

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Entries whose path relative to this folder matches ``pattern`` (``*`` stays within a folder)."""
        deep = pattern.count("/") > 0 or "**" in pattern
        for p, _ in self._walk(deep):
            rel = str(p.relative_to(self))
            if rel.count("/") == pattern.count("/") and fnmatch.fnmatchcase(rel, pattern):
                yield p

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        for p, _ in self._walk(True):
            if fnmatch.fnmatchcase(p.name, pattern):
                yield p

    # -- contents
    def read_bytes(self) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(self.key) as f:
                return bytes(f.read())

        try:
            return bounded(f"GET {self}", read)
        except FileNotFoundError:
            raise
        except OSError as e:
            if not self.is_file():
                raise FileNotFoundError(str(self)) from None
            raise OSError(f"cannot read {self}: {redact(e)}") from None

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        """Publish the object with one PUT (readers see all of it or the old one)."""
        def write() -> int:
            with self.fs.open_output_stream(self.key) as f:
                f.write(data)
            return len(data)

        return bounded(f"PUT {self}", write)

    def write_text(self, text: str) -> int:
        return self.write_bytes(text.encode("utf-8"))

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            bounded(f"DELETE {self}", lambda: self.fs.delete_file(self.key))
        except FileNotFoundError:
            if not missing_ok:
                raise
        except OSError:
            if self.exists() or not missing_ok:
                raise

    def mkdir(self, mode: int = 0o777, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists once an object is under it."""

    def rmdir(self) -> None:
        """Nothing to do (see :meth:`mkdir`)."""


#: Where a run's file lives: a local path or a key in a bucket.
RunPath = Path | ObjectPath


def redact(e: BaseException) -> str:
    """An error's first line, without anything that looks like a credential."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return re.sub(r"(?i)(secret|token|signature|credential|key_id|access_key)[^ ,;]*", r"\1=<hidden>", text)[:300]


def location(path: str | os.PathLike[str] | ObjectPath) -> RunPath:
    """A run path as :class:`~pathlib.Path` (local, ``file://``) or :class:`ObjectPath` (``s3://``, ``gs://``)."""
    if isinstance(path, ObjectPath):
        return path
    text = os.fspath(path)
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    if is_remote(text):
        return ObjectPath(text)
    if "://" in text:
        raise ConfigError(f"{text}: unsupported storage scheme {text.split('://', 1)[0]!r} (use a local path, file://, s3:// or gs://)")
    return Path(text)


def publish(path: RunPath | str, content: bytes | str | Callable[[BinaryIO], object]) -> RunPath:
    """Write ``path`` so that readers see the old content or the new one, never a part; returns it.

    ``content``: bytes, text (UTF-8), or a function writing into a binary file. Local files go through
    :func:`densitune.run.files.atomic_write`; objects are built in memory and PUT once.
    """
    p = location(path) if isinstance(path, str) else path
    if isinstance(p, Path):
        return atomic_write(p, content)
    if callable(content):
        buf = io.BytesIO()
        content(buf)
        data = buf.getvalue()
    else:
        data = content.encode("utf-8") if isinstance(content, str) else content
    p.write_bytes(data)
    return p


def files_under(root: RunPath) -> list[RunPath]:
    """Every file under the folder ``root``, recursively, sorted (one listing request on an object store)."""
    if isinstance(root, ObjectPath):
        return sorted((p for p, is_dir in root._walk(True) if not is_dir), key=str)
    return sorted((p for p in root.rglob("*") if p.is_file()), key=str)


def glob(root: RunPath, pattern: str, *, recursive: bool = False) -> list[RunPath]:
    """``root.glob(pattern)`` (or ``rglob`` with ``recursive``) of a local or bucket folder, sorted."""
    found: Iterator[Any] = root.rglob(pattern) if recursive else root.glob(pattern)
    return sorted(found, key=str)


def tune_storage(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``RunConfig`` keywords for a run's ``tune`` folder: ``storage_path``, an absolute local path, or for a
    bucket its key with ``storage_filesystem``, the store's own client (the timeouts and attempts of
    :func:`storage_timeout`, not pyarrow's defaults, whose ~3 s response limit a slow endpoint fails; Tune
    hands it to its workers on every node, without credentials, which each node takes from its environment)."""
    p = location(path)
    if isinstance(p, ObjectPath):
        return {"storage_path": p.key, "storage_filesystem": p.fs}
    return {"storage_path": str(p.resolve())}


def arrow_files(files: list[RunPath]) -> tuple[list[str], Any]:
    """``(paths, filesystem)`` for ``pyarrow.dataset`` / ``pyarrow.parquet`` over run files of one store."""
    if files and isinstance(files[0], ObjectPath):
        return [f.key for f in files if isinstance(f, ObjectPath)], files[0].fs
    return [str(f) for f in files], None


def arrow_file(path: RunPath) -> tuple[str, Any]:
    """``(path, filesystem)`` of one run file for pyarrow."""
    return (path.key, path.fs) if isinstance(path, ObjectPath) else (str(path), None)


# --------------------------------------------------------------------------------------------- locks on objects

@dataclass
class ObjectLock:
    """A lock object held by this process: its key and the ETag of the version this process wrote."""

    path: ObjectPath
    etag: str


def _s3_client() -> Any:
    import boto3
    from botocore.config import Config

    timeout = storage_timeout()
    return boto3.client("s3", config=Config(connect_timeout=timeout, read_timeout=timeout,
                                            retries={"max_attempts": S3_ATTEMPTS, "mode": "standard"}))


def _split(path: ObjectPath) -> tuple[str, str]:
    if path.scheme != "s3":
        raise ConfigError(f"{path}: writing a run needs a conditional create for its writer lock, which densitune "
                          "supports on s3:// (and local or NFS paths); read this run with report/best/query instead")
    bucket, _, key = path.key.partition("/")
    return bucket, key


def _precondition(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


def create_object(path: ObjectPath, body: bytes, *, replacing: str | None = None) -> ObjectLock | None:
    """Create ``path`` only if it does not exist (``If-None-Match: *``), or replace exactly the version
    ``replacing`` (``If-Match: <etag>``); the held lock, or None when another writer got there first."""
    bucket, key = _split(path)
    cond = {"IfMatch": replacing} if replacing else {"IfNoneMatch": "*"}
    try:
        r = bounded(f"PUT {path}", lambda: _s3_client().put_object(Bucket=bucket, Key=key, Body=body, **cond))
    except StoreStalled:
        raise
    except Exception as e:  # botocore.exceptions.ClientError
        if _precondition(e) or getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise OSError(f"cannot write {path}: {redact(e)}") from None
    return ObjectLock(path, r["ETag"])


def read_object(path: ObjectPath) -> tuple[bytes, str, float] | None:
    """``(body, etag, age in seconds by the store's clock)`` of ``path``, or None if it does not exist."""
    bucket, key = _split(path)
    try:
        r = bounded(f"GET {path}", lambda: _s3_client().get_object(Bucket=bucket, Key=key))
        body = bounded(f"GET {path}", r["Body"].read)
    except StoreStalled:
        raise
    except Exception as e:
        if getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise OSError(f"cannot read {path}: {redact(e)}") from None
    now = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    age = (parsedate_to_datetime(now) - r["LastModified"]).total_seconds() if now else 0.0
    return body, r["ETag"], max(0.0, age)


def delete_object(lock: ObjectLock) -> bool:
    """Delete the lock object if it is still the version this process wrote (``If-Match``)."""
    bucket, key = _split(lock.path)
    try:
        bounded(f"DELETE {lock.path}", lambda: _s3_client().delete_object(Bucket=bucket, Key=key, IfMatch=lock.etag))
    except StoreStalled:
        raise
    except Exception as e:
        if _precondition(e) or getattr(e, "response", {}).get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise OSError(f"cannot delete {lock.path}: {redact(e)}") from None
    return True


# ------------------------------------------------------------------------------------------------------ the run

class RunStore:
    """One run: its root and the layout under it (module docstring).

    >>> RunStore("runs/demo").results      # doctest: +SKIP
    PosixPath('/abs/runs/demo/results')
    """

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        root = location(os.path.expanduser(os.fspath(uri)) if not is_remote(os.fspath(uri)) else os.fspath(uri))
        self.root: RunPath = Path(os.path.abspath(root)) if isinstance(root, Path) else root
        self.remote = isinstance(self.root, ObjectPath)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def models(self) -> RunPath:
        return self.root / "models"

    @property
    def results(self) -> RunPath:
        return self.root / "results"

    @property
    def tune(self) -> str:
        """Ray Tune's ``storage_path`` (a local folder or the bucket URI: Tune writes through pyarrow.fs too)."""
        return str(self.root / "tune")

    def local(self) -> Path:
        """Node-local files of this run (cache, log, Ray session): the run folder itself when it is local."""
        if isinstance(self.root, Path):
            return self.root
        digest = hashlib.sha1(str(self.root).encode()).hexdigest()[:10]
        base = Path(tempfile.gettempdir()) / f"densitune-{os.getuid()}"
        for folder in (base, base / f"{self.root.name}-{digest}"):
            _own_private_folder(folder, self.root)
        return folder

    @property
    def cache(self) -> Path:
        return self.local() / "cache"

    @property
    def log_file(self) -> Path:
        return self.local() / LOG_NAME


def _own_private_folder(folder: Path, run: Any) -> None:
    """Create ``folder`` 0700, or accept it only if it is a real folder of this user (never a link, never
    someone else's: the node-local files of a bucket run sit under the shared ``$TMPDIR``)."""


    try:
        folder.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise StorageError(f"{PREFIX} {folder}: {e.strerror or e} (the local folder of {run})") from None
    st = os.lstat(folder)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{PREFIX} {folder}: it is not a folder but a link or a file (the local folder of {run})")
    if st.st_uid != os.getuid():
        raise StorageError(f"{PREFIX} {folder}: it belongs to user {st.st_uid}, not to this user "
                           f"(the local folder of {run})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(folder, 0o700)


#: What densitune writes below a run's root, per experiment (``{}``), besides the files renamed into place.
WRITTEN = ("locks", "results", "results/experiment={}", "models", "models/{}", "tune", "tune/train-{}",
           "tune/search-{}", "tune/state", "cache", "scores", "scores/experiment={}", "plots", "studies",
           "densitune.log", "ray-session.json")
#: Folders whose whole tree densitune writes into (their sub-folders are checked too).
WRITTEN_TREES = ("results/experiment={}", "models/{}", "cache", "tune/train-{}", "tune/search-{}", "tune/state")


def check_no_links(root: Path, experiment: str) -> None:
    """Refuse to run when a path densitune will write below the run's root goes through a symbolic link.

    ``root`` (the RUN the user gave) may itself be a link: it is resolved once, and below it no component of
    :data:`WRITTEN`, and no folder inside :data:`WRITTEN_TREES`, may be a link (a link planted in a run on shared
    storage would make logs, rows, checkpoints or caches land outside it).

    Raises:
        StorageError: one line naming the link and the run.
    """


    base = Path(os.path.realpath(root))
    for rel in WRITTEN:
        refuse_links_below(base, base / rel.format(experiment))
    for rel in WRITTEN_TREES:
        top = base / rel.format(experiment)
        if not top.is_dir() or top.is_symlink():
            continue
        for folder, dirs, _files in os.walk(top, followlinks=False):
            for name in dirs:
                if os.path.islink(os.path.join(folder, name)):
                    raise _linked(Path(folder, name), base)


def refuse_links_below(root: Path, path: Path) -> None:
    """Refuse to write ``path`` when it lies below the run ``root`` (resolved once) through a symbolic link.

    Raises:
        StorageError: one line naming the link.
    """

    base, target = Path(os.path.realpath(root)), Path(os.path.abspath(path))
    if not target.is_relative_to(base):
        return  # a folder of the user's own choosing, outside the run
    p = base
    for part in target.relative_to(base).parts:
        p = p / part
        try:
            mode = os.lstat(p).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return
        if stat.S_ISLNK(mode):
            raise _linked(p, base)


def _linked(link: Path, run: Path) -> StorageError:
    return StorageError(f"{PREFIX} {link}: it is a symbolic link, and densitune writes only inside the run "
                        f"{run} (remove the link)")
