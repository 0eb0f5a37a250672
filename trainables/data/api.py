"""The data API the rest of densitune calls: look a data set up, describe it, load a split."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from densitune.errors import ConfigError, UnknownNameError
from densitune.ood_groups import parse_set
from densitune.trainables.data import embedded, torchvision_sets  # noqa: F401  (they register their sets)
from densitune.trainables.data.base import DATASETS, DatasetFactory, DatasetInfo
from densitune.trainables.data.folder import PREFIX as FOLDER_PREFIX
from densitune.trainables.data.folder import FolderSet, resolve, scan, split_items
from densitune.trainables.data.sources import EAGER_MAX_ELEMENTS, materialize
from densitune.trainables.data.splits import check_split, limit_positions, rng_for
from densitune.trainables.data.transforms import check_shape

logger = logging.getLogger(__name__)


def get_dataset(name: str) -> DatasetFactory:
    """The factory of a registered name, or of a ``folder:PATH`` name.

    A named OOD set, ``near:NAME=folder:PATH`` or ``far:...``, is the data set ``folder:PATH``.
    Raises :class:`UnknownNameError` naming the known data sets.
    """
    name = parse_set(name).dataset
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path.strip():
            raise ConfigError(f"{name!r}: give the folder's path, e.g. {FOLDER_PREFIX}/data/LSUN_resize")
        return FolderSet(path)
    try:
        return DATASETS.get(name)
    except UnknownNameError as e:
        raise UnknownNameError(f"{e}; or {FOLDER_PREFIX}PATH for a folder of images") from None


def dataset_names() -> list[str]:
    """Registered data set names, then the ``folder:PATH`` form."""
    return [*DATASETS.names(), f"{FOLDER_PREFIX}PATH"]


def _root(root: str | Path | None) -> Path | None:
    return None if root is None else Path(root).expanduser()


def dataset_info(name: str, root: str | Path | None = None) -> DatasetInfo:
    """Native shape, classes and normalisation statistics of data set ``name``.

    ``root`` is only read for ``folder:`` sets (their shape and statistics come from the files).
    """
    return get_dataset(name).info(_root(root))


def ood_group(id_dataset: str, ood_dataset: str) -> str | None:
    """``"near"`` or ``"far"``: how far ``ood_dataset`` lies from ``id_dataset`` (its ``DatasetInfo.ood_groups``).

    None when the in-distribution set is unknown (or a folder) or does not list the OOD set.
    """
    if not isinstance(id_dataset, str) or id_dataset.startswith(FOLDER_PREFIX) or id_dataset not in DATASETS:
        return None
    return dict(DATASETS.get(id_dataset).info(None).ood_groups).get(ood_dataset)


def load_split(
    name: str,
    split: str,
    *,
    root: str | Path | None = None,
    seed: int = 0,
    shape: tuple[int, int, int] | None = None,
    download: bool = False,
    limit: int | None = None,
) -> Dataset:
    """One split of a data set, ready for a ``DataLoader``.

    Args:
        name: a name of :func:`dataset_names` (``folder:PATH`` included).
        split: "train", "val" or "test"; splits never share items (except a ``folder:`` set
            without train/ and test/ folders, which is every split whole).
        root: the data directory of torchvision and relative ``folder:`` sets.
        seed: the data seed; it alone fixes the split, the item order and generated images.
        shape: the (C, H, W) to convert to (3 -> 1 channels by BT.601 luma, 1 -> 3 by repetition,
            then a bilinear antialiased resize); None keeps the native shape.
        download: let torchvision fetch missing files; the network is never used otherwise.
        limit: keep a seeded random subset of at most this many items (same order as the full split).

    Returns:
        A map-style data set of ``(x, y)``: x (C, H, W) float32 in [0, 1], y int64 scalar
        (-1 when unlabelled). Small splits come as a ``TensorDataset`` of converted tensors,
        large ones convert on access, a batch at a time.

    Raises:
        UnknownNameError, ConfigError (bad split, shape, seed or limit), DataError (files).
    """
    check_split(split)
    rng_for(seed)  # validates the seed before any work
    factory = get_dataset(name)
    target = None if shape is None else check_shape(shape)
    source = factory.source(split, root=_root(root), seed=seed, download=download)
    full = len(source)
    keep = limit_positions(full, limit, seed, split)
    if len(keep) < full:
        source = source.subset(keep)
    target = target or source.shape
    data = materialize(source, target)
    logger.debug("%s/%s (seed %d): %d of %d items at %s, %s", name, split, seed, len(source), full, target,
                 type(data).__name__)
    return data


def split_identity(
    name: str, split: str, *, root: str | Path | None = None, seed: int = 0, shape: tuple[int, int, int] | None = None,
    limit: int | None = None,
) -> str | None:
    """A string that changes whenever the files behind :func:`load_split` ``(name, split, ...)`` do, for caches of
    decoded splits shared between processes; None where no such cache pays or applies.

    Only ``folder:`` sets have one (decoding their image files is what a cache saves; see
    :meth:`~densitune.trainables.data.folder.FolderSet.identity`), and only for splits that ``load_split`` reads
    into memory whole (a split converted batch by batch is never held whole, so never cached). The other
    arguments are those of :func:`load_split`; a cache key holds them beside this identity.
    """
    if not parse_set(name).dataset.startswith(FOLDER_PREFIX):
        return None
    factory = get_dataset(name)
    assert isinstance(factory, FolderSet)
    layout = scan(resolve(factory.path, _root(root)), factory.name)  # cached per folder: no pixels read
    c, h, w = layout.shape if shape is None else check_shape(shape)
    n = len(split_items(layout, split, seed)[0])
    if min(n, limit or n) * c * h * w > EAGER_MAX_ELEMENTS:
        return None
    return factory.identity(split, root=_root(root), seed=seed)


def split_checksum(data: Dataset, batch_size: int = 1024) -> str:
    """SHA-256 (first 16 hex digits) of a loaded split's inputs and labels, in order: what a result row
    records of the data it was computed on (two runs with equal checksums saw the same items)."""
    h = hashlib.sha256()
    batches = [data.tensors] if isinstance(data, TensorDataset) else DataLoader(data, batch_size=batch_size)
    for x, y in batches:
        h.update(x.contiguous().numpy().tobytes())
        h.update(y.to(dtype=torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
