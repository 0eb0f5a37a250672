"""``folder:PATH`` data sets: a directory of image files (e.g. the LSUN / iSUN / Textures OOD sets).

Layout, checked in this order:

- ``PATH/train`` and ``PATH/test`` exist: those are the splits; ``PATH/val`` too if present,
  else "val" is a seeded, stratified 10 % of train (and "train" the rest).
- otherwise the whole folder is every split: an OOD set is used whole.

Inside a split, class subfolders give labels from their sorted names, as torchvision's
``ImageFolder`` does (one index space across all splits); a flat folder gives -1. A split with a
single subfolder counts as flat: archives often wrap their images in one folder, and a label 0
there would look like class 0 of the in-distribution data. Images are found recursively,
by extension (case-insensitive); hidden files and folders are skipped.

A relative PATH is taken relative to the data root when one is given (Ray Tune runs trials in
their own working directory), else to the working directory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from densitune.checks import error_summary
from densitune.errors import DataError
from densitune.trainables.data.base import DatasetFactory, DatasetInfo
from densitune.trainables.data.sources import ImageSource
from densitune.trainables.data.splits import SPLITS, rng_for, stratified_split
from densitune.trainables.data.transforms import check_shape, convert_images

logger = logging.getLogger(__name__)

PREFIX = "folder:"
IMAGE_EXTENSIONS = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".pbm", ".tif", ".tiff"}
)
_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "F"})
VAL_FRACTION = 0.1
STATS_IMAGES = 1000  # dataset_info's mean / std come from at most this many training images


def _is_visible(name: str) -> bool:
    return not name.startswith(".")


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def find_images(directory: Path) -> list[Path]:
    """Image files under ``directory``, recursively, sorted by path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = [d for d in dirnames if _is_visible(d)]
        found += [Path(dirpath) / f for f in filenames if _is_visible(f) and _is_image(f)]
    return sorted(found)


def _class_folders(directory: Path) -> dict[str, list[Path]]:
    """Subfolders of ``directory`` that hold images, with their images."""
    out = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir() and _is_visible(p.name)):
        images = find_images(sub)
        if images:
            out[sub.name] = images
    return out


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: scans are cached
class FolderLayout:
    """A scanned folder.

    Attributes:
        paths: per split directory key ("train", "val", "test" or "all"), its image files.
        labels: the matching class indices, -1 where unlabelled.
        classes: sorted class-folder names; empty when unlabelled.
        shape: native (C, H, W), from the first image.
    """

    directory: Path
    paths: dict[str, tuple[str, ...]]
    labels: dict[str, tuple[int, ...]]
    classes: tuple[str, ...]
    shape: tuple[int, int, int]


#: What reading a bad image file raises in PIL: corrupt or truncated data, an unknown format, and a header
#: that declares a decompression bomb (PIL's error, and its warning, which :func:`open_image` makes an error).
_BAD_IMAGE = (OSError, UnidentifiedImageError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError,
              Image.DecompressionBombWarning)


@contextlib.contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open(path)``, where every way a file can be bad is one :class:`DataError` line naming it.

    A file whose header declares more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels is refused before it is decoded
    (PIL only warns below twice that limit; here the warning is an error too).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                yield img
    except _BAD_IMAGE as e:
        raise DataError(f"cannot read image {path}: {error_summary(e)}") from None


def _native_shape(path: Path) -> tuple[int, int, int]:
    with open_image(path) as img:
        return (1 if img.mode in _GREY_MODES else 3, img.height, img.width)


def scan(directory: Path, name: str) -> FolderLayout:
    """Find the splits, classes and images of ``directory`` (absolute); ``name`` is for messages.

    Cached per path and modification time of the folder.
    """
    if not directory.is_dir():
        raise DataError(f"{name}: data not found at {directory} (no such directory)")
    return _scan(directory, name, directory.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _scan(directory: Path, name: str, mtime_ns: int) -> FolderLayout:
    if (directory / "train").is_dir() and (directory / "test").is_dir():
        dirs = {s: directory / s for s in SPLITS if (directory / s).is_dir()}
    else:
        dirs = {"all": directory}
    per_dir = {key: _class_folders(d) for key, d in dirs.items()}
    classes = tuple(sorted({c for folders in per_dir.values() for c in folders}))
    if len(classes) < 2:
        classes = ()
    paths: dict[str, tuple[str, ...]] = {}
    labels: dict[str, tuple[int, ...]] = {}
    for key, d in dirs.items():
        if classes:
            pairs = [(str(p), classes.index(c)) for c, imgs in per_dir[key].items() for p in imgs]
            loose = [p for p in d.iterdir() if p.is_file() and _is_image(p.name)]
            if loose:
                logger.warning("%s: ignoring %d images outside the class folders", d, len(loose))
        else:
            pairs = [(str(p), -1) for p in find_images(d)]
        if not pairs:
            raise DataError(f"{name}: no images found in {d}")
        paths[key] = tuple(p for p, _ in pairs)
        labels[key] = tuple(y for _, y in pairs)
    first = paths["train"][0] if "train" in paths else paths["all"][0]
    return FolderLayout(directory, paths, labels, classes, _native_shape(Path(first)))


def load_image(path: str | Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """One image file as (C, H, W) float32 in [0, 1] at ``shape`` (mode conversion, then resize)."""
    with open_image(path) as img:
        eight_bit = img.mode in ("RGB", "L")  # the usual case: no conversion copy, already in [0, 1] after / 255
        if eight_bit:
            arr = np.asarray(img, dtype=np.float32) / 255.0
        elif img.mode.startswith("I"):  # 16/32-bit grey (e.g. 16-bit PNG): 0..65535, not 0..255
            arr = np.asarray(img, dtype=np.float32) / 65535.0
        elif img.mode == "F":
            arr = np.asarray(img, dtype=np.float32)
        else:
            converted = img.convert("L" if img.mode in _GREY_MODES else "RGB")
            arr = np.asarray(converted, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr if eight_bit else np.clip(arr, 0.0, 1.0))
    x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)
    return convert_images(x.unsqueeze(0), shape)[0]


#: images decoded and converted together by :meth:`FolderSource.read`
_READ_BATCH = 256


def _eight_bit(path: str) -> np.ndarray | None:
    """The (H, W) or (H, W, 3) uint8 pixels of an 8-bit grey or RGB image file, else None (see :func:`load_image`)."""
    with open_image(path) as img:
        return np.asarray(img) if img.mode in ("RGB", "L") else None


class FolderSource(ImageSource):
    """Image files, read from disk at each access."""

    def __init__(self, paths: tuple[str, ...], labels: torch.Tensor, shape: tuple[int, int, int]) -> None:
        super().__init__(labels, shape)
        if len(paths) != len(self):
            raise ValueError(f"{len(paths)} paths but {len(self)} labels")
        self.paths = paths

    def read(self, index: np.ndarray, shape: tuple[int, int, int]) -> torch.Tensor:
        """Items ``index`` as (n, *shape) float32: what :func:`load_image` gives each, bit for bit. Runs of 8-bit
        images of one size are converted together (one stack, one division, one :func:`convert_images`) instead
        of tensor by tensor; any other image goes through :func:`load_image` on its own."""
        shape = check_shape(shape)
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        out = torch.empty((len(idx), *shape), dtype=torch.float32)
        for start in range(0, len(idx), _READ_BATCH):
            stop = min(start + _READ_BATCH, len(idx))
            decoded = [_eight_bit(self.paths[int(i)]) for i in idx[start:stop]]
            pixels = [a for a in decoded if a is not None]
            if len(pixels) == len(decoded) and len({a.shape for a in pixels}) == 1:
                x = torch.from_numpy(np.stack(pixels).astype(np.float32) / 255.0)  # load_image's arithmetic
                out[start:stop] = convert_images(x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2), shape)
            else:
                for k, i in enumerate(idx[start:stop], start):
                    out[k] = load_image(self.paths[int(i)], shape)
        return out

    def subset(self, index: np.ndarray) -> FolderSource:
        idx = np.asarray(index, dtype=np.int64).reshape(-1)
        return FolderSource(tuple(self.paths[int(i)] for i in idx), self.labels[torch.from_numpy(idx)], self.shape)


def resolve(path: str, root: str | Path | None) -> Path:
    """The absolute directory ``path`` names (relative paths are taken under ``root`` if given)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root).expanduser() / p
    return p.resolve()


@functools.lru_cache(maxsize=32)
def _stats(layout: FolderLayout) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over the pixels of up to :data:`STATS_IMAGES` training images."""
    key = "train" if "train" in layout.paths else "all"
    src = FolderSource(layout.paths[key], torch.tensor(layout.labels[key]), layout.shape)
    n = len(src)
    pick = np.sort(rng_for(0, "folder-stats").choice(n, size=min(n, STATS_IMAGES), replace=False))
    x = src.read(pick, layout.shape).double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)) if x.numel() > x.shape[1] else torch.ones_like(mean)
    return tuple(float(m) for m in mean), tuple(max(float(s), 1e-3) for s in std)


def split_items(layout: FolderLayout, split: str, seed: int) -> tuple[tuple[str, ...], np.ndarray]:
    """The image paths and (n,) int64 labels of ``split``."""
    if "all" in layout.paths:
        key = "all"
    elif split == "test" or "val" in layout.paths:
        key = split
    else:  # no val/ folder: "val" is a held-out part of train/
        labels = np.asarray(layout.labels["train"], dtype=np.int64)
        rest, held = stratified_split(labels, (1 - VAL_FRACTION, VAL_FRACTION), rng_for(seed, "folder", "val"))
        idx = held if split == "val" else rest
        return tuple(layout.paths["train"][int(i)] for i in idx), labels[idx]
    return layout.paths[key], np.asarray(layout.labels[key], dtype=np.int64)


@dataclass(frozen=True)
class FolderSet(DatasetFactory):
    """The data set of ``folder:PATH``; made on demand by the name lookup, never registered."""

    path: str

    @property
    def name(self) -> str:
        return PREFIX + self.path

    def info(self, root: Path | None) -> DatasetInfo:
        layout = scan(resolve(self.path, root), self.name)
        mean, std = _stats(layout)
        return DatasetInfo(self.name, layout.shape, len(layout.classes) or None, mean, std, "folder")

    def identity(self, split: str, *, root: Path | None, seed: int) -> str:
        """What names the files of ``split`` now: a SHA-1 of each image's path, size and modification time, in
        order. A file replaced, touched, added or removed (a fresh scan) changes it; reading no pixels, it costs
        one ``stat`` per image."""
        paths, _ = split_items(scan(resolve(self.path, root), self.name), split, seed)
        h = hashlib.sha1()
        for path in paths:
            st = os.stat(path)
            h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        layout = scan(resolve(self.path, root), self.name)
        paths, labels = split_items(layout, split, seed)
        if not paths:
            raise DataError(f"{self.name}: split {split!r} is empty (too few images under {layout.directory})")
        return FolderSource(paths, torch.from_numpy(labels), layout.shape)
