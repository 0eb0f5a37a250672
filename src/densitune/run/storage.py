"""Storage failures: checked before a run, and fatal during one.

* Before Ray starts, :func:`check_writable` refuses an output folder that cannot be created
  or written (a file in the way, a read-only or immutable parent), naming the path.
* During a run, a failed write of results or checkpoints (read-only or immutable folder,
  full disk, quota) raises :class:`StorageError` inside the trial (:func:`fatal_storage`);
  it is fatal (:mod:`densitune.run.failures`): the whole Tune run stops at that first failure,
  so no pending trial starts only to fail on its own write, and the CLI prints the one line
  that names the path and the cause.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from densitune.errors import STORAGE_PREFIX as PREFIX
from densitune.errors import StorageError
from densitune.run.runstore import ObjectPath, endpoint, location, redact

__all__ = ["PREFIX", "StorageError", "check_writable", "describe", "fatal_storage", "storage_error", "storage_failure"]

#: Codes of an object store that refused the credentials, by the names boto3 and pyarrow's AWS SDK give them.
_DENIED = ("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "INVALID_ACCESS_KEY_ID",
           "SIGNATURE_DOES_NOT_MATCH", "ExpiredToken", "InvalidToken", "403")
_NO_BUCKET = ("NoSuchBucket", "NO_SUCH_BUCKET", "bucket does not exist", "Bucket does not exist")
#: What Ray Tune raises when the experiment state it wrote is gone from the store (emptied, restarted empty).
_TUNE_GONE = ("No experiment snapshot file", "experiment_state")


def storage_error(e: BaseException) -> StorageError | None:
    """One line for an error of the object store that escaped a command (wrong credentials, a missing bucket,
    a run whose Tune state vanished, a request that failed for good), or None when ``e`` is not one."""
    text = str(e)
    where = m.group(0) if (m := re.search(r"(?:s3|gs|gcs)://[^\s'\",)]+", text)) else None
    if not where and (m := re.search(r"key '([^']*)' in bucket '([^']+)'", text)):
        where = f"s3://{m.group(2)}/{m.group(1)}"
    elif not where and (m := re.search(r"bucket '([^']+)'", text)):
        where = f"s3://{m.group(1)}"
    cause = m.group(0) if (m := re.search(r"\b[A-Z][A-Z_]+ during \w+", text)) else redact(e)
    at = f"the object store at {endpoint()}"
    if isinstance(e, ValueError) and not isinstance(e, StorageError):
        if any(k in text for k in _TUNE_GONE[:1]):
            return StorageError(f"the run's Ray Tune state vanished from {at} ({redact(e)}); the rows "
                                "already written stand: rerun without --resume into a new --experiment, or restore the store")
        return None
    if not isinstance(e, OSError):
        return None
    if any(k in text for k in _NO_BUCKET):
        return StorageError(f"{where or 'the run'}: no such bucket at {at} (create it, or check the name)")
    if any(k in text for k in _DENIED):
        return StorageError(f"{where or 'the run'}: {at} refused the credentials ({cause}); check "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE")
    if "AWS Error" in text or "curlCode" in text or where:
        return StorageError(f"{where or 'the run'}: {at} failed: {cause}")
    return None


def describe(e: OSError, path: str | Path) -> str:
    """``cannot write FOLDER: cause`` for an OSError raised while writing under ``path``.

    pyarrow raises OSErrors without ``filename``/``errno`` ("Failed to open local file '...'.
    Detail: [errno 1] ..."): the file and the errno are read from its text. A temporary
    file's folder is named rather than its throw-away name.
    """
    text = str(e)
    where: str | Path = e.filename or (m.group(1) if (m := re.search(r"'(/[^']+)'", text)) else path)
    if Path(where).name.startswith(".tmp-"):
        where = Path(where).parent
    code = e.errno if e.errno is not None else (int(m.group(1)) if (m := re.search(r"\[errno (\d+)\]", text)) else None)
    cause = os.strerror(code) if code is not None else (e.strerror or (text.strip().splitlines() or [type(e).__name__])[0])
    return f"{PREFIX} {where}: {cause}"[:400]


@contextmanager
def fatal_storage(path: str | Path) -> Iterator[None]:
    """Turn an OSError of the writes in the block into a :class:`StorageError` naming the path and cause."""
    try:
        yield
    except OSError as e:
        raise StorageError(describe(e, path)) from None


def check_writable(path: str | Path, flag: str = "--out") -> None:
    """Refuse (before anything is written) an output folder that cannot be created or written.

    A local path is checked where its first write would land (not resolved: a dangling link is
    refused); a bucket URI by writing and deleting a probe object under the run.
    """
    loc = location(str(path))
    if isinstance(loc, ObjectPath):
        marker = loc / "locks" / f".probe-{os.getpid()}"
        try:
            marker.write_bytes(b"")
            marker.unlink(missing_ok=True)
        except OSError as e:
            raise StorageError(f"{PREFIX} {loc}: {redact(e)} ({flag})") from None
        return
    local = Path(os.path.abspath(os.path.expanduser(path)))
    probe = local
    while not probe.exists():  # the nearest existing folder is where the first write would land
        if probe.parent == probe:
            break
        if probe.is_symlink():
            raise StorageError(f"{PREFIX} {local}: {probe} is a dangling link ({flag})")
        probe = probe.parent
    if not probe.is_dir():
        raise StorageError(f"{PREFIX} {local}: {probe} is not a folder ({flag})")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StorageError(f"{PREFIX} {local}: {probe} is not writable ({flag})")


def storage_failure(errors: list[Any]) -> StorageError | None:
    """The first storage failure among trial errors (as Tune returns them), or None."""
    for err in errors:
        if isinstance(err, StorageError):
            return StorageError(str(err).strip().splitlines()[-1].split("StorageError: ", 1)[-1])
        for line in reversed(str(err).strip().splitlines()):
            if "StorageError: " in line:
                return StorageError(line.split("StorageError: ", 1)[1].strip())
    return None


