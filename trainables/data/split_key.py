"""The typed name of one loaded split: what the search caches data, features and densities under."""

from __future__ import annotations

from dataclasses import dataclass

from torch.utils.data import Dataset

from densitune.trainables.data.api import load_split, split_identity

__all__ = ["SplitKey"]


@dataclass(frozen=True)
class SplitKey:
    """One split of a data set as :func:`~densitune.trainables.data.load_split` loads it.

    ``name`` (a registered data set or ``folder:PATH``), ``split`` (train / val / test), ``shape`` (C, H, W) it is
    converted to (None: native), ``root`` the data directory, ``seed`` the data seed, ``limit`` the seeded subset
    size (None: whole). Hashable; it crosses layers as itself. :meth:`token` is the string cache files are keyed
    by (the repr of the plain tuple these keys were before they had a type, so existing caches stay valid).
    """

    name: str
    split: str
    shape: tuple[int, int, int] | None
    root: str | None
    seed: int = 0
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.shape is not None and not isinstance(self.shape, tuple):  # a shape read from JSON is a list
            object.__setattr__(self, "shape", tuple(self.shape))

    def as_tuple(self) -> tuple[str, str, tuple[int, int, int] | None, str | None, int, int | None]:
        """(name, split, shape, root, seed, limit)."""
        return (self.name, self.split, self.shape, self.root, self.seed, self.limit)

    def token(self) -> str:
        """The cache-key string of this split: ``repr`` of :meth:`as_tuple`."""
        return repr(self.as_tuple())

    @property
    def label(self) -> str:
        """``<data set>/<split>``: how a result row's checksums name it."""
        return f"{self.name}/{self.split}"

    def load(self) -> Dataset:
        """:func:`~densitune.trainables.data.load_split` of this split."""
        return load_split(self.name, self.split, root=self.root, seed=self.seed, shape=self.shape, limit=self.limit)

    def identity(self) -> str | None:
        """:func:`~densitune.trainables.data.split_identity` of this split (None: no shared disk entry)."""
        return split_identity(self.name, self.split, root=self.root, seed=self.seed, shape=self.shape, limit=self.limit)
