"""Offline data sets built from scikit-learn's bundled files: the digits and OOD sets around them.

``digits`` (Alpaydin & Kaynak's 8x8 handwritten digits, UCI) is the in-distribution default; the
others are out-of-distribution probes at the same (1, 8, 8):

- near-OOD, made from the digits of the same split: ``digits-rot90``, ``digits-hflip``,
  ``digits-blend`` (mean of two digits of different classes);
- far-OOD: ``photo-patches`` (natural-image patches), ``noise-uniform`` and ``noise-blobs`` (smooth
  random blobs: a far set for validation, distinct from every default test set).

Nothing here ever touches the network.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from densitune.ood_groups import OOD_GROUPS
from densitune.trainables.data.base import DATASETS, DatasetFactory, DatasetInfo
from densitune.trainables.data.sources import ArraySource, ImageSource
from densitune.trainables.data.splits import SPLITS, rng_for, stratified_split
from densitune.trainables.data.transforms import rgb_to_luma

logger = logging.getLogger(__name__)

DIGITS_SHAPE: tuple[int, int, int] = (1, 8, 8)
DIGITS_FRACTIONS: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test
OOD_SIZE = 400  # items per split of photo-patches and noise-uniform
PATCH_CROP = 32  # photo-patches: side of the crop that is shrunk to 8x8


@functools.lru_cache(maxsize=1)
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits: (1797, 1, 8, 8) float32 in [0, 1] (0..16 / 16), and (1797,) int64 labels."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


@functools.lru_cache(maxsize=16)
def _digits_parts(seed: int) -> tuple[np.ndarray, ...]:
    """Index arrays of the train / val / test digits for ``seed``: stratified 60 / 20 / 20."""
    _, y = _digits()
    return tuple(stratified_split(y.numpy(), DIGITS_FRACTIONS, rng_for(seed, "digits", "split")))


def digits_split(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits of ``split``, in ascending order of their index in ``load_digits()``.

    Returns:
        (n, 1, 8, 8) float32 images in [0, 1] and (n,) int64 labels (fresh copies).
    """
    x, y = _digits()
    idx = torch.from_numpy(_digits_parts(seed)[SPLITS.index(split)])
    return x[idx], y[idx]


@functools.lru_cache(maxsize=1)
def _digits_info() -> DatasetInfo:
    # dataset_info takes no seed: the statistics come from the seed-0 training split (they move
    # in the third decimal between seeds).
    x, _ = digits_split("train", 0)
    mean, std = float(x.mean()), float(x.std())
    ood = ("digits-blend", ("digits-rot90", "digits-hflip", "photo-patches", "noise-uniform"))
    return DatasetInfo("digits", DIGITS_SHAPE, 10, (mean,), (std,), "embedded", default_ood=ood,
                       ood_groups=OOD_GROUPS["digits"])


def _ood_info(name: str) -> DatasetInfo:
    """OOD-only sets report the digits' statistics: they are fed to a digits model."""
    d = _digits_info()
    return DatasetInfo(name, DIGITS_SHAPE, None, d.mean, d.std, "embedded")


def _unlabelled(x: torch.Tensor) -> ArraySource:
    return ArraySource(x.contiguous(), torch.full((x.shape[0],), -1, dtype=torch.int64))


class DigitsSet(DatasetFactory):
    """scikit-learn's digits, 10 classes, seeded stratified 60 / 20 / 20 split (1078 / 360 / 359 items)."""

    def info(self, root: Path | None) -> DatasetInfo:
        return _digits_info()

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        return ArraySource(*digits_split(split, seed))


DATASETS.add("digits", DigitsSet())


Transform = Callable[[torch.Tensor, torch.Tensor, np.random.Generator], torch.Tensor]


@dataclass(frozen=True)
class DerivedDigits(DatasetFactory):
    """Near-OOD: item i is ``transform`` of digit i of the same split and seed; label -1."""

    name: str
    transform: Transform

    def info(self, root: Path | None) -> DatasetInfo:
        return _ood_info(self.name)

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        x, y = digits_split(split, seed)
        return _unlabelled(self.transform(x, y, rng_for(seed, self.name, split)))


def rot90(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) -> the same digits turned 90 degrees counter-clockwise (``torch.rot90(x, 1, (-2, -1))``)."""
    return torch.rot90(x, 1, dims=(-2, -1))


def hflip(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) -> the same digits mirrored left-right."""
    return torch.flip(x, dims=(-1,))


def blend(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(n, 1, 8, 8) -> item i is the pixel mean of digit i and a random digit of another class."""
    labels = y.numpy()
    n = len(labels)
    partner = rng.integers(0, n, size=n)
    same = labels[partner] == labels
    while same.any():  # redraw until every partner has a different class
        partner[same] = rng.integers(0, n, size=int(same.sum()))
        same = labels[partner] == labels
    return (x + x[torch.from_numpy(partner)]) / 2


DATASETS.add("digits-rot90", DerivedDigits("digits-rot90", rot90))
DATASETS.add("digits-hflip", DerivedDigits("digits-hflip", hflip))
DATASETS.add("digits-blend", DerivedDigits("digits-blend", blend))


@functools.lru_cache(maxsize=1)
def _photos() -> dict[str, torch.Tensor]:
    """scikit-learn's two sample photos as grey (H, W) float32 in [0, 1], by file name."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images()
    out = {}
    for filename, img in zip(photos.filenames, photos.images):
        rgb = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
        out[Path(filename).name] = rgb_to_luma(rgb)[0]
    return out


def _photo_region(split: str) -> torch.Tensor:
    """The (H, W) grey region a split's patches come from.

    val: all of china.jpg; train / test: the left / right half of flower.jpg, so that no
    training patch shares a pixel with a test patch.
    """
    if split == "val":
        return _photos()["china.jpg"]
    flower = _photos()["flower.jpg"]
    half = flower.shape[1] // 2
    return flower[:, :half] if split == "train" else flower[:, half:]


def photo_patches(split: str, seed: int, n: int = OOD_SIZE) -> torch.Tensor:
    """``n`` distinct random 32x32 crops of the split's photo region, shrunk to 8x8 by 4x4 area
    means and min-max stretched per patch to [0, 1] (a flat patch becomes all 0).

    Returns:
        (n, 1, 8, 8) float32 in [0, 1].
    """
    region = _photo_region(split)
    rows, cols = region.shape[0] - PATCH_CROP + 1, region.shape[1] - PATCH_CROP + 1
    flat = rng_for(seed, "photo-patches", split).choice(rows * cols, size=n, replace=False)
    r0 = torch.from_numpy(flat // cols).view(n, 1, 1)
    c0 = torch.from_numpy(flat % cols).view(n, 1, 1)
    offset = torch.arange(PATCH_CROP)
    crops = region[r0 + offset.view(1, -1, 1), c0 + offset.view(1, 1, -1)]  # (n, 32, 32)
    k = PATCH_CROP // 8
    small = crops.view(n, 8, k, 8, k).mean(dim=(2, 4))
    lo = small.amin(dim=(1, 2), keepdim=True)
    span = small.amax(dim=(1, 2), keepdim=True) - lo
    stretched = torch.where(span > 1e-6, (small - lo) / span.clamp_min(1e-6), torch.zeros_like(small))
    return stretched.clamp_(0.0, 1.0).unsqueeze(1)


class PhotoPatches(DatasetFactory):
    """Far-OOD natural-image patches, 400 per split, grey 8x8, label -1."""

    def info(self, root: Path | None) -> DatasetInfo:
        return _ood_info("photo-patches")

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        return _unlabelled(photo_patches(split, seed))


class UniformNoise(DatasetFactory):
    """Far-OOD i.i.d. uniform pixels in [0, 1), 400 per split, label -1."""

    def info(self, root: Path | None) -> DatasetInfo:
        return _ood_info("noise-uniform")

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        noise = rng_for(seed, "noise-uniform", split).random((OOD_SIZE, *DIGITS_SHAPE), dtype=np.float32)
        return _unlabelled(torch.from_numpy(noise))


def noise_blobs(split: str, seed: int, n: int = OOD_SIZE) -> torch.Tensor:
    """``n`` smooth random images: 4x4 uniform noise upsampled bilinearly to 8x8, min-max stretched per image.

    Returns:
        (n, 1, 8, 8) float32 in [0, 1].
    """
    coarse = torch.from_numpy(rng_for(seed, "noise-blobs", split).random((n, 1, 4, 4), dtype=np.float32))
    x = torch.nn.functional.interpolate(coarse, size=DIGITS_SHAPE[1:], mode="bilinear", align_corners=False)
    lo = x.amin(dim=(2, 3), keepdim=True)
    return ((x - lo) / (x.amax(dim=(2, 3), keepdim=True) - lo).clamp_min(1e-6)).clamp_(0.0, 1.0)


class NoiseBlobs(DatasetFactory):
    """Far-OOD smooth random blobs, 400 per split, grey 8x8, label -1 (the demo's far validation set)."""

    def info(self, root: Path | None) -> DatasetInfo:
        return _ood_info("noise-blobs")

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        return _unlabelled(noise_blobs(split, seed))


DATASETS.add("photo-patches", PhotoPatches())
DATASETS.add("noise-uniform", UniformNoise())
DATASETS.add("noise-blobs", NoiseBlobs())
