"""Standard image benchmarks read with torchvision from a data directory (``--data-root``).

Splits: "train" is the official training set minus a seeded, stratified 10 % that forms "val";
"test" is the official test set in its official order. The network is used only when a caller
passes ``download=True``.

torchvision's CIFAR and SVHN classes compare each local file's md5 with the published one on
every load. The md5 is what guards a download, and it is checked then (the archive or .mat file
is verified by torchvision while downloading); local copies are checked here for presence and,
by parsing them, for format. That also lets a directory that holds only the split in use (often
just SVHN's test_32x32.mat, for OOD evaluation) be loaded.
"""

from __future__ import annotations

import abc
import functools
import logging
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from densitune.errors import DataError
from densitune.ood_groups import OOD_GROUPS
from densitune.trainables.data.base import DATASETS, DatasetFactory, DatasetInfo
from densitune.trainables.data.sources import ArraySource, ImageSource
from densitune.trainables.data.splits import rng_for, stratified_split

if TYPE_CHECKING:
    from torchvision import datasets as tvd

logger = logging.getLogger(__name__)

VAL_FRACTION = 0.1
_HINT = "pass --data-root DIR, or --download where the internet is reachable"
# What torchvision raises on a file in the wrong format (it uses asserts for the MNIST header).
_FORMAT_ERRORS = (OSError, RuntimeError, ValueError, KeyError, TypeError, IndexError, AssertionError, EOFError,
                  pickle.UnpicklingError)


class _CifarFromDisk:
    """Mixin for torchvision's CIFAR10 / CIFAR100: presence check instead of md5 (see module doc)."""

    root: str
    base_folder: str
    train: bool
    train_list: list[list[str]]
    test_list: list[list[str]]
    meta: dict[str, str]

    def _check_integrity(self) -> bool:
        files = [f for f, _ in (self.train_list if self.train else self.test_list)] + [self.meta["filename"]]
        return all(os.path.isfile(os.path.join(self.root, self.base_folder, f)) for f in files)

    def __init__(self, root: str | Path, train: bool = True, download: bool = False) -> None:
        # torchvision's own __init__ unpickles the batches with plain pickle.load; this one
        # reads the same files through _load_batch, which builds nothing but numpy arrays.
        from torchvision import datasets as tvd

        tvd.VisionDataset.__init__(self, str(root))
        self.train = train
        if download:
            self.download()  # type: ignore[attr-defined]
        if not self._check_integrity():
            raise RuntimeError("Dataset not found or corrupted. You can use download=True to download it")
        data, targets = [], []
        for name, _ in self.train_list if train else self.test_list:
            entry = _load_batch(os.path.join(self.root, self.base_folder, name))
            data.append(entry["data"])
            targets.extend(entry["labels"] if "labels" in entry else entry["fine_labels"])
        self.data = np.vstack(data).reshape(-1, 3, 32, 32).transpose((0, 2, 3, 1))
        self.targets = targets
        self._load_meta()

    def _load_meta(self) -> None:
        self.classes = _load_batch(os.path.join(self.root, self.base_folder, self.meta["filename"]))[self.meta["key"]]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class _ArraysOnly(pickle.Unpickler):
    """Unpickles CIFAR's python batches (dicts of lists, bytes and numpy arrays) and nothing else.

    Any other global in the stream (``os.system``, a class with ``__reduce__``...) is refused,
    so a planted file cannot run code.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 store bytes
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")
        return super().find_class(module, name)


def _load_batch(path: str) -> dict[str, Any]:
    with open(path, "rb") as f:
        out = _ArraysOnly(f, encoding="latin1").load()
    if not isinstance(out, dict):
        raise pickle.UnpicklingError("not a CIFAR batch (expected a dict)")
    return out


class _MnistSplitFiles:
    """Mixin for torchvision's MNIST family: need only the two raw files of the split in use.

    torchvision names the data folder after the class; keep the public class's name.
    """

    root: str
    train: bool
    _folder: str

    @property
    def raw_folder(self) -> str:
        return os.path.join(self.root, self._folder, "raw")

    @property
    def processed_folder(self) -> str:
        return os.path.join(self.root, self._folder, "processed")

    def _check_exists(self) -> bool:
        return all(os.path.isfile(p) for p in mnist_files(Path(self.root), self._folder, self.train))


@functools.cache
def _torchvision_classes() -> dict[str, Any]:
    """torchvision's data set classes with this module's checks, by name: made on first use, because importing
    torchvision costs seconds (it imports its detection ops and torch._dynamo) that a process which reads only
    image folders or the embedded sets should not pay."""
    from torchvision import datasets as tvd

    class _CIFAR10(_CifarFromDisk, tvd.CIFAR10):
        pass

    class _CIFAR100(_CifarFromDisk, tvd.CIFAR100):
        pass

    class _SVHN(tvd.SVHN):
        """torchvision's SVHN with a presence check instead of md5 (see module doc)."""

        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

        def download(self) -> None:
            if not self._check_integrity():
                super().download()

    class _MNIST(_MnistSplitFiles, tvd.MNIST):
        _folder = "MNIST"

    class _FashionMNIST(_MnistSplitFiles, tvd.FashionMNIST):
        _folder = "FashionMNIST"

    return {"cifar10": _CIFAR10, "cifar100": _CIFAR100, "svhn": _SVHN, "mnist": _MNIST, "fashionmnist": _FashionMNIST}


def mnist_files(root: Path, folder: str, train: bool) -> list[Path]:
    """The raw idx files torchvision reads for one MNIST-style split (uncompressed)."""
    prefix = "train" if train else "t10k"
    raw = root / folder / "raw"
    return [raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"]


class TorchvisionSet(DatasetFactory):
    """A torchvision data set: fixed description, files under the data root."""

    def __init__(self, info: DatasetInfo) -> None:
        self._info = info

    @property
    def name(self) -> str:
        return self._info.name

    def info(self, root: Path | None) -> DatasetInfo:
        return self._info

    @abc.abstractmethod
    def required(self, root: Path, train: bool) -> list[Path]:
        """The files one official split (train or test) is read from, after the folder holding them if
        it is specific to this data set (so that a missing folder is named, not its first file)."""

    @abc.abstractmethod
    def read(self, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The official split through torchvision: (N, C, H, W) uint8 images and (N,) int64 labels."""

    def source(self, split: str, *, root: Path | None, seed: int, download: bool) -> ImageSource:
        train = split != "test"
        if root is None:
            raise DataError(f"{self.name}: no data directory given ({_HINT})")
        if not download:
            self._check_present(root, train)
        try:
            images, labels = self.read(root, train, download)
        except DataError:
            raise
        except _FORMAT_ERRORS as e:
            what = "download failed" if download else "cannot read the files"
            detail = " ".join(str(e).split()) or type(e).__name__
            raise DataError(f"{self.name}: {what} at {self.required(root, train)[0]}: {detail}") from e
        logger.debug("%s: read %d official %s images from %s", self.name, len(labels), split, root)
        if train:
            parts = stratified_split(labels.numpy(), (1 - VAL_FRACTION, VAL_FRACTION), rng_for(seed, self.name, "val"))
            keep = torch.from_numpy(parts[0] if split == "train" else parts[1])
            images, labels = images[keep], labels[keep]
        return ArraySource(images, labels)

    def _check_present(self, root: Path, train: bool) -> None:
        for path in self.required(root, train):
            if not path.exists():
                hint = f"; found {path.name}.gz: decompress it" if Path(f"{path}.gz").is_file() else ""
                raise DataError(f"{self.name}: data not found at {path} ({_HINT}{hint})")


class CifarSet(TorchvisionSet):
    @property
    def cls(self) -> type[tvd.CIFAR10]:
        return cast("type[tvd.CIFAR10]", _torchvision_classes()[self.name])

    def required(self, root: Path, train: bool) -> list[Path]:
        folder = root / self.cls.base_folder
        files = [f for f, _ in (self.cls.train_list if train else self.cls.test_list)]
        return [folder, *(folder / f for f in files), folder / self.cls.meta["filename"]]

    def read(self, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds: Any = self.cls(str(root), train=train, download=download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
        return images, torch.as_tensor(ds.targets, dtype=torch.int64)


class SvhnSet(TorchvisionSet):
    def required(self, root: Path, train: bool) -> list[Path]:
        cls = _torchvision_classes()["svhn"]
        return [root / cls.split_list["train" if train else "test"][1]]  # torchvision reads root/<file>

    def read(self, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = _torchvision_classes()["svhn"](str(root), split="train" if train else "test", download=download)
        # torchvision already maps the label 10 of digit 0 to 0, and the data to (N, C, H, W).
        images = torch.from_numpy(np.ascontiguousarray(ds.data, dtype=np.uint8))
        return images, torch.as_tensor(ds.labels, dtype=torch.int64).reshape(-1)


class MnistSet(TorchvisionSet):
    def __init__(self, info: DatasetInfo, folder: str) -> None:
        super().__init__(info)
        self.folder = folder  # torchvision's folder name: its class's name

    def required(self, root: Path, train: bool) -> list[Path]:
        return [root / self.folder / "raw", *mnist_files(root, self.folder, train)]

    def read(self, root: Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = _torchvision_classes()[self.name](str(root), train=train, download=download)
        return ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64)


def _info(
    name: str, shape: tuple[int, int, int], k: int, mean: tuple[float, ...], std: tuple[float, ...],
    default_ood: tuple[str | tuple[str, ...], tuple[str, ...]] | None = None, ood_groups: tuple[tuple[str, str], ...] = (),
) -> DatasetInfo:
    return DatasetInfo(name, shape, k, mean, std, "torchvision", default_ood, ood_groups)


DATASETS.add("cifar10", CifarSet(
    _info("cifar10", (3, 32, 32), 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
          default_ood=(("folder:tiny-imagenet-val", "noise-blobs"), ("svhn", "cifar100", "mnist")),
          ood_groups=OOD_GROUPS["cifar10"])))
DATASETS.add("cifar100", CifarSet(
    _info("cifar100", (3, 32, 32), 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))))
DATASETS.add("svhn", SvhnSet(
    _info("svhn", (3, 32, 32), 10, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970))))
DATASETS.add("mnist", MnistSet(_info("mnist", (1, 28, 28), 10, (0.1307,), (0.3081,),
                                     default_ood=(("folder:ood-val", "noise-blobs"), ("fashionmnist", "cifar10", "svhn")),
                                     ood_groups=OOD_GROUPS["mnist"]), "MNIST"))
DATASETS.add("fashionmnist", MnistSet(_info("fashionmnist", (1, 28, 28), 10, (0.2860,), (0.3530,)), "FashionMNIST"))
