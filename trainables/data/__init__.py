"""Data sets: one registry, seeded splits, conversion to a model's input shape.

Every item is ``(x, y)``: x (C, H, W) float32 in [0, 1], y an int64 scalar, -1 when unlabelled.

- embedded (scikit-learn, offline): ``digits`` and its OOD probes ``digits-rot90``,
  ``digits-hflip``, ``digits-blend``, ``photo-patches``, ``noise-uniform``;
- torchvision, under ``--data-root``: ``cifar10``, ``cifar100``, ``svhn``, ``mnist``, ``fashionmnist``;
- ``folder:PATH``: a directory of image files.
"""

from __future__ import annotations

from densitune.trainables.data.api import (
    dataset_info,
    dataset_names,
    get_dataset,
    load_split,
    ood_group,
    split_checksum,
    split_identity,
)
from densitune.trainables.data.base import DATASETS, DatasetFactory, DatasetInfo
from densitune.trainables.data.split_key import SplitKey
from densitune.trainables.data.splits import SPLITS
from densitune.trainables.data.transforms import convert_images

__all__ = [
    "DATASETS",
    "SPLITS",
    "SplitKey",
    "DatasetFactory",
    "DatasetInfo",
    "convert_images",
    "dataset_info",
    "dataset_names",
    "get_dataset",
    "load_split",
    "ood_group",
    "split_checksum",
    "split_identity",
]
