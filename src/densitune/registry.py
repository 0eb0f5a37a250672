"""One registry per kind of thing (backbones, datasets, losses, densities, scores).

Modelled on timm's ``register_model`` / ``create_model``: a decorator registers an
object next to its definition, and looking up an unknown name fails with the list
of known names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar, cast

from densitune.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> object mapping for one kind of thing.

    >>> BACKBONES = Registry("backbone")
    >>> @BACKBONES.register("cnn")
    ... def make_cnn(**kw): ...
    >>> BACKBONES.get("cnn")  # the function
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name`` (default: its ``__name__``)."""

        def deco(obj: T) -> T:
            key = name or cast(Any, obj).__name__
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} registered twice")
            self._items[key] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> T:
        """Register ``obj`` under ``name`` without a decorator."""
        return self.register(name)(obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``; :class:`UnknownNameError` names the known ones."""
        try:
            return self._items[name]
        except KeyError:
            known = ", ".join(sorted(self._items)) or "(none)"
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def check(self, name: str) -> str:
        """Return ``name`` if registered, else raise :class:`UnknownNameError`."""
        self.get(name)
        return name

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
