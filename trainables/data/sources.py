"""Where the images of one split come from, and the torch ``Dataset`` built on top.

A factory (see :mod:`densitune.trainables.data.base`) hands :func:`~densitune.trainables.data.api.load_split` an
:class:`ImageSource`: the labels in memory and a ``read`` that yields any items at any shape.
``load_split`` then either reads everything once into a ``TensorDataset`` (small sets) or wraps
the source in a :class:`LazyImageDataset` that converts batch by batch (CIFAR-sized sets, image
folders), so a 45 000-image training split never sits in memory as float32.
"""

from __future__ import annotations

import abc
import logging

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from densitune.trainables.data.transforms import check_shape, convert_images

logger = logging.getLogger(__name__)

#: Above this many float32 elements (64 MiB) a split is converted item by item, not up front.
EAGER_MAX_ELEMENTS = 1 << 24
_CHUNK = 4096


class ImageSource(abc.ABC):
    """The images and labels of one split.

    Attributes:
        labels: (N,) int64, -1 for unlabelled items.
        shape: the native (C, H, W) of the images.
    """

    def __init__(self, labels: torch.Tensor, shape: tuple[int, int, int]) -> None:
        self.labels = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
        self.shape = check_shape(shape)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @abc.abstractmethod
    def read(self, index: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
        """Items ``index`` ((n,) int positions) as (n, *shape) float32 in [0, 1]."""

    @abc.abstractmethod
    def subset(self, index: np.ndarray) -> ImageSource:
        """A source of the items at positions ``index`` ((n,) int), in that order."""


class ArraySource(ImageSource):
    """Images held in memory as one (N, C, H, W) tensor: uint8 in 0..255 or float32 in [0, 1]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dim() != 4 or images.dtype not in (torch.uint8, torch.float32):
            raise ValueError(f"expected (N, C, H, W) uint8 or float32 images, got {images.dtype} {tuple(images.shape)}")
        super().__init__(labels, tuple(images.shape[1:]))  # type: ignore[arg-type]
        if images.shape[0] != len(self):
            raise ValueError(f"{images.shape[0]} images but {len(self)} labels")
        self.images = images

    def read(self, index: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
        x = self.images[torch.as_tensor(index, dtype=torch.int64)]
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        return convert_images(x, shape)

    def subset(self, index: np.ndarray) -> ArraySource:
        i = torch.as_tensor(index, dtype=torch.int64)
        return ArraySource(self.images[i], self.labels[i])


class LazyImageDataset(Dataset):
    """Items ``(x, y)`` of a source, converted on access: x (C, H, W) float32 in [0, 1], y int64 scalar.

    Implements ``__getitems__`` so that a ``DataLoader`` converts a whole batch in one call.
    """

    def __init__(self, source: ImageSource, shape: tuple[int, int, int]) -> None:
        self.source = source
        self.shape = check_shape(shape)

    def __len__(self) -> int:
        return len(self.source)

    def _positions(self, indices: list[int]) -> np.ndarray:
        n = len(self)
        pos = np.asarray(indices, dtype=np.int64).reshape(-1)
        if np.any((pos < -n) | (pos >= n)):
            raise IndexError(f"index out of range for a data set of {n} items")
        return pos % max(n, 1)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self._positions([int(index)])
        return self.source.read(pos, self.shape)[0], self.source.labels[int(pos[0])]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        pos = self._positions(indices)
        x = self.source.read(pos, self.shape)
        y = self.source.labels[torch.as_tensor(pos)]
        return list(zip(x.unbind(0), y.unbind(0)))


def materialize(source: ImageSource, shape: tuple[int, int, int]) -> Dataset:
    """A ``TensorDataset`` of the converted items when they fit :data:`EAGER_MAX_ELEMENTS`, else lazy."""
    n = len(source)
    shape = check_shape(shape)
    if n * shape[0] * shape[1] * shape[2] > EAGER_MAX_ELEMENTS:
        return LazyImageDataset(source, shape)
    x = torch.empty((n, *shape), dtype=torch.float32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        x[start:stop] = source.read(np.arange(start, stop), shape)
    return TensorDataset(x, source.labels.clone())
