"""How far each known OOD set lies from an in-distribution set: ``near`` or ``far``.

The one declaration of the groups the report's summary sorts its columns by (OpenOOD's near / far
split). The data sets' :class:`~densitune.trainables.data.DatasetInfo` take their ``ood_groups``
from here, and the results layer reads it without importing the data code (and so torch).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import PurePath

from densitune.checks import check_path_component
from densitune.errors import ConfigError

#: in-distribution set -> ((OOD set, "near" | "far"), ...)
OOD_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "digits": (("digits-rot90", "near"), ("digits-hflip", "near"), ("digits-blend", "near"),
               ("photo-patches", "far"), ("noise-uniform", "far")),
    "cifar10": (("cifar100", "near"), ("folder:tiny-imagenet-val", "near"), ("svhn", "far"), ("mnist", "far"),
                ("fashionmnist", "far"), ("noise-blobs", "far")),
    "mnist": (("fashionmnist", "near"), ("cifar10", "far"), ("cifar100", "far"), ("svhn", "far"), ("noise-blobs", "far")),
}


def ood_group(id_dataset: str, ood_dataset: str) -> str | None:
    """``"near"`` / ``"far"`` for a known pair; None when either set is not listed."""
    return dict(OOD_GROUPS.get(id_dataset, ())).get(ood_dataset)


# ----------------------------------------------------------------------------- a researcher's own sets

#: The kinds a set may be given by name (``near:NAME=folder:PATH``); a set without one is "unknown".
KINDS = ("near", "far")
UNKNOWN = "unknown"
#: What NAME may hold in ``near:NAME=folder:PATH``.
SET_NAME = re.compile(r"[A-Za-z0-9._-]+")
FOLDER = "folder:"


@dataclass(frozen=True)
class OodSet:
    """One OOD set as given on the command line: ``dataset`` is what is loaded (a registered name or
    ``folder:PATH``); ``kind`` and ``name`` are set by the named form ``near:NAME=folder:PATH`` only."""

    text: str
    dataset: str
    kind: str | None = None
    name: str | None = None


def parse_set(text: str) -> OodSet:
    """``near:NAME=folder:PATH`` / ``far:NAME=folder:PATH`` (parsed only when ``text`` starts with ``near:`` or
    ``far:``), else ``text`` itself as the data set. Raises :class:`ConfigError` for a malformed named form."""
    kind = next((k for k in KINDS if text.startswith(f"{k}:")), None)
    if kind is None:
        return OodSet(text, text)
    name, sep, dataset = text[len(kind) + 1:].partition("=")
    if not sep or not dataset.startswith(FOLDER) or not dataset[len(FOLDER):].strip():
        raise ConfigError(f"OOD set {_shown(text)}: the named form is {kind}:NAME=folder:PATH")
    if not SET_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"OOD set {_shown(text)}: NAME must be letters, digits, '.', '_' or '-' (not . or ..)")
    check_path_component(name, "OOD set name")
    return OodSet(text, dataset, kind, name)


def is_attack(name: str) -> bool:
    """Whether an ``ood_dataset`` names attacked ID inputs (``adv-<attack>``, ``proxy-<attack>``), not a data set."""
    return name.startswith(("adv-", "proxy-"))


def set_labels(id_dataset: str, sets: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{set as given: (kind, short name)}`` for the OOD sets of one search.

    A named set keeps its kind and NAME; a registered set its name and the kind :data:`OOD_GROUPS` gives it
    (else "unknown"); a ``folder:`` set its folder's own name and kind "unknown". Short names are made unique
    in the order given (``-2``, ``-3``... after a name already taken)."""
    out: dict[str, tuple[str, str]] = {}
    taken: set[str] = set()
    for text in dict.fromkeys(sets):
        s = parse_set(text)
        if s.kind is not None and s.name is not None:
            kind, short = s.kind, s.name
        elif s.dataset.startswith(FOLDER):
            kind, short = UNKNOWN, PurePath(s.dataset[len(FOLDER):].rstrip("/")).name or s.dataset
        else:
            kind, short = ood_group(id_dataset, s.dataset) or UNKNOWN, s.dataset
        unique, n = short, 1
        while unique in taken:
            n += 1
            unique = f"{short}-{n}"
        taken.add(unique)
        out[text] = (kind, unique)
    return out


def _shown(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= 200 else flat[:199] + "…")
