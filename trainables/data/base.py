"""What a data set is to the rest of densitune: its description and the factory that builds its splits."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path

from densitune.registry import Registry
from densitune.trainables.data.sources import ImageSource


@dataclass(frozen=True)
class DatasetInfo:
    """A data set's description, as a model built for it needs it.

    Attributes:
        name: the registry name (or ``folder:PATH``).
        shape: native (C, H, W) of its images.
        num_classes: number of classes, None for unlabelled (OOD-only) sets.
        mean, std: per-channel statistics in [0, 1] pixel space, one per channel, for the
            model's Normalize layer.
        source: "embedded" (shipped with scikit-learn), "torchvision" or "folder".
        default_ood: for an in-distribution set, the OOD sets a search uses when none are given:
            (validation OOD set(s) used for selection, e.g. one near and one far; test OOD sets); None where
            there is no default.
        ood_groups: for an in-distribution set, ``(OOD set, "near" | "far")`` pairs: how far each known OOD
            set lies from it (OpenOOD's near / far split; semantic shift with similar images vs a different
            kind of image). Reports group their OOD columns by it; a set not listed has no group.
    """

    name: str
    shape: tuple[int, int, int]
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    default_ood: tuple[str | tuple[str, ...], tuple[str, ...]] | None = None
    ood_groups: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if len(self.mean) != self.shape[0] or len(self.std) != self.shape[0]:
            raise ValueError(f"{self.name}: need one mean and std per channel of {self.shape}")


class DatasetFactory(abc.ABC):
    """Builds the splits of one data set.

    :func:`~densitune.trainables.data.dataset_info` calls :meth:`info` (e.g. when a model is built, for its
    input shape and Normalize layer); :func:`~densitune.trainables.data.load_split` calls :meth:`source`
    once per split it loads, then applies ``limit`` and the shape conversion itself, so a
    factory only ever deals with native images.
    """

    @abc.abstractmethod
    def info(self, root: Path | None) -> DatasetInfo:
        """The description; ``root`` is the data directory (only folders need to look at it)."""

    @abc.abstractmethod
    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        """The items of ``split`` ("train", "val" or "test") at native shape, fixed by the data ``seed``.

        Raises :class:`~densitune.errors.DataError` when the files are missing or unreadable.
        """


#: The one registry of data sets. ``folder:PATH`` names are resolved by
#: :func:`~densitune.trainables.data.get_dataset`, not registered.
DATASETS: Registry[DatasetFactory] = Registry("dataset")
