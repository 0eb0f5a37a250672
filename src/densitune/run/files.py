"""One way to write a local file so that readers see the old file or the new one, never a part.

Used by every writer of the package: result Parquet files and the stored spec, checkpoints
(``model.pt``, ``config.json``) and the disk cache. :func:`load_tensors` is the one reader of
torch files: plain tensors and containers only, never an arbitrary pickled object.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

if TYPE_CHECKING:
    from densitune.run.runstore import ObjectPath

__all__ = ["DocumentError", "atomic_write", "fsync_dir", "load_tensors", "parse_document", "read_document", "temp_path"]


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
    import torch

    source: Any = path if isinstance(path, str | Path) else io.BytesIO(path.read_bytes())  # an ObjectPath
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(source, map_location=map_location, weights_only=True)


# ------------------------------------------------------------------------- documents read from a run

#: A run file or spec is a few KiB of keys; one larger than this is not densitune's (or not a user's spec).
DOCUMENT_MAX_BYTES = 1 << 20
#: Nesting deeper than this is not a run file or a spec (``[[[[...`` would exhaust the parser's stack).
DOCUMENT_MAX_DEPTH = 32


class DocumentError(ValueError):
    """A JSON or YAML document that is too large, too deep, not UTF-8 or not well-formed; its message is one
    short line without the path (callers name the file in their own error)."""


def _depth(value: Any, limit: int) -> None:
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            if d > limit:
                raise DocumentError(f"nested deeper than {limit} levels")
            stack += [(x, d + 1) for x in (v.values() if isinstance(v, dict) else v)]


def parse_document(data: bytes, fmt: str = "json", *, max_bytes: int = DOCUMENT_MAX_BYTES,
                   max_depth: int = DOCUMENT_MAX_DEPTH) -> Any:
    """The JSON (or YAML: bounded, aliases refused) document in ``data``, checked for size, UTF-8 and depth.

    Raises:
        DocumentError: what is wrong with it, in a few words.
    """
    if len(data) > max_bytes:
        size = f"{max_bytes // 1024} KiB" if max_bytes % 1024 == 0 else f"{max_bytes} bytes"
        raise DocumentError(f"larger than {size}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise DocumentError("not a text file (not UTF-8)") from None
    if "\0" in text:
        raise DocumentError("holds a NUL byte")
    try:
        if fmt == "yaml":
            from densitune.run._yaml import load_yaml_text

            value = load_yaml_text(text)
        else:

            value = json.loads(text, parse_constant=lambda c: _bad_constant(c))
    except RecursionError:
        raise DocumentError(f"nested deeper than {max_depth} levels") from None
    except DocumentError:
        raise
    except ValueError as e:  # json.JSONDecodeError, and the YAML loader's errors (as ValueError)
        raise DocumentError(f"not valid {fmt.upper()}: {str(e).splitlines()[0][:160]}") from None
    _depth(value, max_depth)
    return value


def _bad_constant(name: str) -> Any:
    raise DocumentError(f"holds {name}, which is not JSON")


def read_document(path: str | Path | ObjectPath, fmt: str = "json", *, max_bytes: int = DOCUMENT_MAX_BYTES,
                  max_depth: int = DOCUMENT_MAX_DEPTH) -> Any:
    """:func:`parse_document` of a file in a run (or a spec file): the one reader of JSON and YAML files.

    A local file is opened without following a final symbolic link and must be a regular file (a link to
    ``/dev/zero`` or a FIFO is refused, never read); at most ``max_bytes + 1`` bytes are read.

    Raises:
        FileNotFoundError: there is no such file (callers decide whether that is an error).
        DocumentError: the file is not a regular file, is unreadable, or :func:`parse_document` refuses it.
    """

    if not isinstance(path, str | Path):  # an object in a bucket (densitune.run.runstore.ObjectPath)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            raise DocumentError(f"unreadable ({e.strerror or type(e).__name__})") from None
        return parse_document(data, fmt, max_bytes=max_bytes, max_depth=max_depth)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:

        if e.errno == errno.ELOOP:
            raise DocumentError("is a symbolic link") from None
        raise DocumentError(f"unreadable ({e.strerror or type(e).__name__})") from None
    try:

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DocumentError("is not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(max_bytes + 1)
    except OSError as e:
        raise DocumentError(f"unreadable ({e.strerror or type(e).__name__})") from None
    finally:
        os.close(fd)
    return parse_document(data, fmt, max_bytes=max_bytes, max_depth=max_depth)
