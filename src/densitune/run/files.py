"""One way to write a local file so that readers see the old file or the new one, never a part.

Used by every writer of the package: result Parquet files and the stored spec, checkpoints
(``model.pt``, ``config.json``) and the disk cache. :func:`load_tensors` is the one reader of
torch files: plain tensors and containers only, never an arbitrary pickled object.
"""

from __future__ import annotations

import io
import os
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from densitune.run.runstore import ObjectPath

__all__ = ["atomic_write", "fsync_dir", "load_tensors", "temp_path"]


def temp_path(path: Path) -> Path:
    """A hidden temporary name beside ``path``, unique per process and call (``.tmp-*``: readers skip it)."""
    return path.with_name(f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}-{path.name}")


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable (best effort: not every OS or file system allows it)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, content: bytes | str | Callable[[BinaryIO], object]) -> Path:
    """Write ``path`` atomically: a unique temporary file beside it, fsync, rename over ``path``, fsync the folder.

    ``content`` is the bytes (or UTF-8 text) to write, or a function that writes into the open binary file
    (``lambda f: torch.save(obj, f)``). Of two processes writing at once, one wins whole; on an error the
    temporary file is removed and ``path`` is untouched. Returns ``path``.
    """
    path = Path(path)
    tmp = temp_path(path)
    if callable(content):  # serialised in memory first: a full disk then fails in our write, as an OSError
        buf = io.BytesIO()  # naming the file and ENOSPC, not as a library's own message (torch: "unexpected pos")
        content(buf)
        content = buf.getvalue()
    try:
        with open(tmp, "wb") as f:
            f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def load_tensors(path: str | Path | ObjectPath, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and containers of them.

    Anything else (a planted pickle of arbitrary objects) raises instead of being executed. torch's own
    warnings about such a file (e.g. its pickle protocol) are silenced: the caller reports the error in
    one line.
    """
    import io

    import torch

    from densitune.run.runstore import ObjectPath

    source: Any = io.BytesIO(path.read_bytes()) if isinstance(path, ObjectPath) else path
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location=map_location, weights_only=True)
