"""Bounded YAML for spec files: a size cap, no aliases, and error text that never echoes a whole value.

A spec file is a few hundred bytes of keys and lists. YAML aliases let 357 bytes expand
into gigabytes ("billion laughs": each level repeats the previous one nine times), so
this loader refuses every alias before anything is built, and refuses files larger than
:data:`MAX_SPEC_BYTES` before parsing them. Only PyYAML and the standard library are
imported here: a spec is rejected before torch or Ray are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from densitune.errors import ConfigError
from densitune.run.files import DocumentError, read_document

#: Largest spec file read (bytes). Real specs are well under 4 KiB.
MAX_SPEC_BYTES = 256 * 1024
#: How many characters of a user's value an error message repeats.
ECHO_LIMIT = 200


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message: one line, cut to ``limit`` characters.

    Large containers are cut before ``repr`` builds their whole text.
    """
    if isinstance(value, (list, tuple)) and len(value) > limit:
        value = type(value)(value[:limit])
    if isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_yaml(path: Path, *, max_bytes: int = MAX_SPEC_BYTES) -> Any:
    """The YAML document in ``path``; :class:`ConfigError` naming the file if it is too large, too deep, not UTF-8,
    has aliases or is invalid (read by :func:`densitune.run.files.read_document`, the one reader of documents)."""

    try:
        return read_document(path, "yaml", max_bytes=max_bytes)
    except FileNotFoundError:
        raise ConfigError(f"{path}: cannot read the spec file: no such file") from None
    except DocumentError as e:
        raise ConfigError(f"{path}: {e}") from None
