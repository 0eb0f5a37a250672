"""Parameter checks in one place, with one error wording; and one line for an error.

Modelled on scikit-learn's ``_parameter_constraints``: a class (or function) declares, per
parameter, the list of constraints a value may satisfy, and :func:`check_params` raises
:class:`~densitune.errors.ConfigError` with one wording for every violation::

    {what} must be {constraint[ or constraint...]}, got {value!r}

Constraints: ``None`` (the value may be None), :data:`BOOL`, :data:`STRING`, :data:`INTEGER`,
:data:`NUMBER`, :data:`MAPPING` (types only), :class:`Interval`
(an integer or finite real number in a range; a bool is never a number), :class:`Options`
(one of a set of values) and :class:`ListOf` (a list whose items meet one constraint).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from densitune.errors import ConfigError

__all__ = ["BOOL", "INTEGER", "MAPPING", "NUMBER", "STRING", "Interval", "ListOf", "Options", "check_params",
           "check_path_component", "check_path_text", "describe", "error_summary", "satisfies"]

#: The longest error summary (characters): one readable line, never a whole traceback.
SUMMARY_CHARS = 200


@dataclass(frozen=True)
class _Kind:
    name: str
    text: str


BOOL = _Kind("bool", "true or false")
STRING = _Kind("str", "a string")
#: any int (not a bool), any real number (not a bool): type checks without a range
INTEGER = _Kind("int", "an integer")
NUMBER = _Kind("number", "a number")
MAPPING = _Kind("mapping", "a mapping")


@dataclass(frozen=True)
class Interval:
    """An ``int`` (``kind=int``) or finite real number (``kind=float``) in [low, high] (``None``: unbounded).

    ``closed`` says which ends belong to the interval: "both", "left", "right" or "neither". With
    ``kind=None`` only the range is checked and named ("> 0"): for values whose type was checked before.
    """

    kind: type | None
    low: float | None = None
    high: float | None = None
    closed: str = "both"

    def accepts(self, v: Any) -> bool:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral if self.kind is int else numbers.Real):
            return False
        v = float(v)
        if not math.isfinite(v):
            return False
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and (v < self.low or (v == self.low and not left)):
            return False
        return not (self.high is not None and (v > self.high or (v == self.high and not right)))

    def text(self) -> str:
        what = "an integer" if self.kind is int else "a finite number" if self.kind is float else ""
        bounds = []
        if self.low is not None:
            bounds.append(f"{'>=' if self.closed in ('both', 'left') else '>'} {self.low:g}")
        if self.high is not None:
            bounds.append(f"{'<=' if self.closed in ('both', 'right') else '<'} {self.high:g}")
        return f"{what} {' and '.join(bounds)}".strip()


@dataclass(frozen=True)
class Options:
    """One of ``values`` (compared with ==; a bool never matches a number)."""

    values: tuple[Any, ...]

    def accepts(self, v: Any) -> bool:
        return any(v == o and isinstance(v, bool) == isinstance(o, bool) for o in self.values)

    def text(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.values)


@dataclass(frozen=True)
class ListOf:
    """A list (or tuple) whose every item satisfies ``item``; ``nonempty`` refuses []."""

    item: Any
    nonempty: bool = False

    def accepts(self, v: Any) -> bool:
        if not isinstance(v, (list, tuple)) or (self.nonempty and not v):
            return False
        return all(satisfies(x, [self.item]) for x in v)

    def text(self) -> str:
        return f"a {'non-empty ' if self.nonempty else ''}list of {_text(self.item).removeprefix('a ').removeprefix('an ')}s"


def _text(c: Any) -> str:
    if c is None:
        return "None"
    if isinstance(c, _Kind):
        return c.text
    if isinstance(c, type):
        return f"a {c.__name__}"
    return str(c.text())


def satisfies(value: Any, constraints: Iterable[Any]) -> bool:
    """Whether ``value`` meets at least one of ``constraints``."""
    for c in constraints:
        if c is None:
            if value is None:
                return True
        elif c is BOOL:
            if isinstance(value, bool) or type(value).__name__ == "bool_":  # numpy.bool_ too
                return True
        elif c is STRING:
            if isinstance(value, str):
                return True
        elif c is INTEGER or c is NUMBER:
            kind = numbers.Integral if c is INTEGER else numbers.Real
            if isinstance(value, kind) and not isinstance(value, bool):
                return True
        elif c is MAPPING:
            if isinstance(value, Mapping):
                return True
        elif isinstance(c, type):
            if isinstance(value, c) and not (isinstance(value, bool) and c is not bool):
                return True
        elif c.accepts(value):
            return True
    return False


def describe(constraints: Iterable[Any]) -> str:
    """``constraints`` in words, e.g. "an integer >= 1 or None"."""
    return " or ".join(_text(c) for c in constraints)


def check_params(
    values: Mapping[str, Any],
    constraints: Mapping[str, list[Any]],
    *,
    labels: Mapping[str, str] | None = None,
    prefix: str = "",
) -> None:
    """Raise :class:`ConfigError` for the first value in ``values`` that meets none of its constraints.

    Only keys present in both mappings are checked. ``labels`` gives a parameter a reader's name
    (``{"feature_dim": "feature dimension D"}``); ``prefix`` goes before it (``"training config "``).
    """
    labels = labels or {}
    for name, allowed in constraints.items():
        if name in values and not satisfies(values[name], allowed):
            what = f"{prefix}{labels.get(name, name)}"
            raise ConfigError(f"{what} must be {describe(allowed)}, got {values[name]!r}")


def error_summary(error: BaseException | str, *, last: bool = False, limit: int = SUMMARY_CHARS) -> str:
    """One line for an error: its first non-empty line (``last=True``: its last one, which is where a
    traceback that Ray wraps around a trial's exception keeps ``ExceptionType: message``), at most
    ``limit`` characters; the exception's type name when it has no text."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    if not lines:
        return type(error).__name__ if isinstance(error, BaseException) else ""
    line = lines[-1] if last else lines[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------ names in paths

#: Limits of what a run lives on: a Linux file system's longest name and path (bytes), an S3 key (bytes).
NAME_MAX, PATH_MAX, KEY_MAX = 255, 4096, 1024
#: Every file or folder name densitune derives from a name it is given (``{}``): the results partition, Tune's
#: experiment folders, the writer lock, and the temporary name of an atomic write of the longest of those
#: (``densitune.run.files.temp_path``: ``.tmp-<pid>-<12 hex>-``). The longest decides.
DERIVED_NAMES = ("experiment={}", "train-{}", "search-{}", ".tmp-4194304-0123456789ab-{}.json")
#: Bytes a run adds below its root to the longest path it writes under a derived name (Tune's trial folders
#: and checkpoint files); a root plus this plus the derived name must stay within PATH_MAX (KEY_MAX in a bucket).
DEEPEST_BELOW = 320


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else f"{text[:40]}…{text[-12:]}")


def check_path_component(name: str, what: str, *, root: str | None = None) -> str:
    """Refuse a name that becomes part of file names, before anything is written or Ray starts.

    The name may hold no NUL and no ``/``; the longest name derived from it (:data:`DERIVED_NAMES`) must fit
    ``NAME_MAX``, and with ``root`` (the run's folder or bucket URI) the deepest path under it ``PATH_MAX``
    (an object key: ``KEY_MAX``).

    Raises:
        ConfigError: one line naming ``what`` and the limit.
    """
    if "\0" in name or "/" in name:
        raise ConfigError(f"{what} {_shown(name)} holds a NUL or '/': it becomes part of file names")
    longest = max(len(form.format(name).encode("utf-8", "surrogateescape")) for form in DERIVED_NAMES)
    if longest > NAME_MAX:
        raise ConfigError(f"{what} {_shown(name)} is too long: file names derived from it take {longest} bytes, "
                          f"more than the file system's {NAME_MAX}")
    if root is not None:
        remote = "://" in root
        below = root.split("://", 1)[1].partition("/")[2] if remote else root
        total = len(below.encode("utf-8", "surrogateescape")) + 1 + longest + DEEPEST_BELOW
        limit = KEY_MAX if remote else PATH_MAX
        if total > limit:
            raise ConfigError(f"{what} {_shown(name)} under {_shown(root)}: the deepest path the run writes takes about "
                              f"{total} bytes, more than the {'object key' if remote else 'path'} limit of {limit}")
    return name


def check_path_text(text: str, what: str) -> str:
    """Refuse a path given as text (a flag, a spec file, a run file) that no file system can take:
    a NUL byte, more than ``PATH_MAX`` bytes, or a component longer than ``NAME_MAX``.

    Raises:
        ConfigError: one line naming ``what``.
    """
    if not isinstance(text, str):
        raise ConfigError(f"{what} must be a path, got {type(text).__name__}")
    if "\0" in text:
        shown = _shown(text.replace(chr(0), "\\0"))
        raise ConfigError(f"{what} {shown} holds a NUL byte")
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) > PATH_MAX:
        raise ConfigError(f"{what} is {len(raw)} bytes long, more than the path limit of {PATH_MAX}")
    if any(len(part) > NAME_MAX for part in raw.split(b"/")):
        raise ConfigError(f"{what} {_shown(text)} has a component longer than {NAME_MAX} bytes")
    return text
