"""Behaviour of densitune.trainables.data: splits, OOD probes, on-disk formats, conversion, errors.

The torchvision sets are tested on tiny files written in each data set's real on-disk format
(pickled CIFAR batches, SVHN .mat files, MNIST idx files), so loading goes through torchvision's
own readers without any download.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from densitune.errors import ConfigError, DataError, UnknownNameError
from densitune.trainables.data import (
    DATASETS,
    SPLITS,
    DatasetInfo,
    convert_images,
    dataset_info,
    dataset_names,
    load_split,
    ood_group,
    sources,
)

EMBEDDED_OOD = ["digits-rot90", "digits-hflip", "digits-blend", "photo-patches", "noise-uniform", "noise-blobs"]


def items(ds) -> tuple[torch.Tensor, torch.Tensor]:
    """All (N, C, H, W) images and (N,) labels of a data set, through its public item access."""
    xs, ys = zip(*(ds[i] for i in range(len(ds))))
    return torch.stack(xs), torch.stack(ys)


def hashes(x: torch.Tensor) -> list[str]:
    return [hashlib.sha1(img.numpy().tobytes()).hexdigest() for img in x]


def as_uint8(x: torch.Tensor) -> np.ndarray:
    """[0, 1] floats back to the 0..255 bytes they were made from (x * 255 is exact up to rounding)."""
    return torch.round(x * 255).to(torch.uint8).numpy()


# --------------------------------------------------------------------------------------------- digits


def test_digits_splits_partition_the_1797_images_stratified() -> None:
    parts = {s: items(load_split("digits", s, seed=0)) for s in SPLITS}
    sizes = {s: len(parts[s][1]) for s in SPLITS}
    assert sizes == {"train": 1078, "val": 360, "test": 359}
    assert sum(sizes.values()) == 1797
    keys = {s: set(hashes(parts[s][0])) for s in SPLITS}
    assert sum(len(k) for k in keys.values()) == 1797  # no image twice, within or across splits
    assert not (keys["train"] & keys["val"] or keys["train"] & keys["test"] or keys["val"] & keys["test"])
    for s in SPLITS:
        counts = torch.bincount(parts[s][1], minlength=10)
        assert (counts > 0).all()
        share = counts.double() / counts.sum()
        assert torch.allclose(share, torch.full((10,), 0.1, dtype=torch.float64), atol=0.012)


def test_digits_items() -> None:
    ds = load_split("digits", "train")
    assert isinstance(ds, TensorDataset)
    x, y = ds[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.dim() == 0
    xs, ys = items(ds)
    assert xs.min() == 0.0 and xs.max() == 1.0
    assert torch.equal(torch.round(xs * 16), xs * 16)  # the 0..16 grey levels, divided by 16
    assert set(ys.tolist()) == set(range(10))


def test_digits_split_depends_on_the_seed_only() -> None:
    a, b, c = (items(load_split("digits", "test", seed=s)) for s in (3, 3, 4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert set(hashes(a[0])) != set(hashes(c[0]))


def test_digits_info_has_training_split_statistics() -> None:
    info = dataset_info("digits")
    ood = ("digits-blend", ("digits-rot90", "digits-hflip", "photo-patches", "noise-uniform"))
    groups = (("digits-rot90", "near"), ("digits-hflip", "near"), ("digits-blend", "near"),
              ("photo-patches", "far"), ("noise-uniform", "far"))
    assert info == DatasetInfo("digits", (1, 8, 8), 10, info.mean, info.std, "embedded", default_ood=ood, ood_groups=groups)
    # every default OOD set is a registered data set other than digits itself, and has a near/far group
    assert all(n in dataset_names() and n != "digits" for n in (ood[0], *ood[1]))
    assert {n for n, _ in groups} == {ood[0], *ood[1]}
    assert ood_group("digits", "digits-rot90") == "near" and ood_group("digits", "noise-uniform") == "far"
    assert ood_group("cifar10", "cifar100") == "near" and ood_group("mnist", "cifar10") == "far"
    assert ood_group("digits", "svhn") is None and ood_group("folder:/x", "digits") is None
    x, _ = items(load_split("digits", "train", seed=0))
    assert info.mean[0] == pytest.approx(float(x.mean()), abs=1e-6)
    assert info.std[0] == pytest.approx(float(x.std()), abs=1e-6)


# ------------------------------------------------------------------------------------ embedded OOD


@pytest.mark.parametrize("name", EMBEDDED_OOD)
def test_embedded_ood_set(name: str) -> None:
    info = dataset_info(name)
    assert info.shape == (1, 8, 8) and info.num_classes is None and info.source == "embedded"
    val, test = (items(load_split(name, s, seed=1)) for s in ("val", "test"))
    for x, y in (val, test):
        assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0
        assert (y == -1).all()
    assert not set(hashes(val[0])) & set(hashes(test[0]))
    again = items(load_split(name, "val", seed=1))
    assert torch.equal(again[0], val[0])
    wide = items(load_split(name, "test", seed=1, shape=(3, 32, 32)))[0]
    assert wide.shape == (len(test[0]), 3, 32, 32)
    assert wide.min() >= 0.0 and wide.max() <= 1.0
    assert torch.equal(wide[:, 0], wide[:, 1]) and torch.equal(wide[:, 0], wide[:, 2])


@pytest.mark.parametrize(
    "name, transform",
    [
        ("digits-rot90", lambda x: torch.rot90(x, 1, dims=(-2, -1))),
        ("digits-hflip", lambda x: torch.flip(x, dims=(-1,))),
    ],
)
def test_geometric_probes_transform_the_same_split(name: str, transform) -> None:
    for split in SPLITS:
        digits, _ = items(load_split("digits", split, seed=2))
        probe, _ = items(load_split(name, split, seed=2))
        assert torch.equal(probe, transform(digits))


def test_digits_blend_means_two_digits_of_different_classes() -> None:
    digits, labels = items(load_split("digits", "val", seed=5))
    blend, _ = items(load_split("digits-blend", "val", seed=5))
    by_image = {h: int(y) for h, y in zip(hashes(digits), labels)}
    # item i = (digit i + partner) / 2, exact in float32 (grey levels are multiples of 1/16)
    partners = hashes(2 * blend - digits)
    for i, h in enumerate(partners):
        assert h in by_image, "the other half of a blend is not a digit of the same split"
        assert by_image[h] != int(labels[i])
    assert len(set(partners)) > 100  # not all paired with a few digits
    other_seed, _ = items(load_split("digits-blend", "val", seed=6))
    assert not torch.equal(other_seed[: len(blend)], blend)


def test_photo_patches_are_stretched_and_come_from_different_photos() -> None:
    x = {s: items(load_split("photo-patches", s, seed=0))[0] for s in SPLITS}
    assert all(len(v) == 400 for v in x.values())
    for v in x.values():
        lo, hi = v.amin(dim=(1, 2, 3)), v.amax(dim=(1, 2, 3))
        assert (lo == 0).all() and (hi == 1).float().mean() > 0.99  # per-patch min-max stretch
        assert v.std(dim=(1, 2, 3)).mean() > 0.1  # textured, not flat
    assert not set(hashes(x["train"])) & set(hashes(x["test"]))
    assert not torch.equal(x["train"], items(load_split("photo-patches", "train", seed=1))[0])


def test_noise_depends_on_split_and_seed() -> None:
    a = items(load_split("noise-uniform", "train", seed=0))[0]
    assert a.shape == (400, 1, 8, 8)
    assert abs(float(a.mean()) - 0.5) < 0.02
    assert not torch.equal(a, items(load_split("noise-uniform", "train", seed=1))[0])
    assert not torch.equal(a, items(load_split("noise-uniform", "test", seed=0))[0])


# ------------------------------------------------------------------------------ shape conversion


def test_convert_images_channel_rules_and_resize() -> None:
    red = torch.zeros(1, 3, 10, 14)
    red[:, 0] = 1.0
    grey = convert_images(red, (1, 4, 4))
    assert grey.shape == (1, 1, 4, 4)
    assert torch.allclose(grey, torch.full_like(grey, 0.299))  # BT.601 luma of pure red
    ramp = torch.linspace(0, 1, 8).view(1, 1, 1, 8).expand(1, 1, 8, 8)
    rgb = convert_images(ramp, (3, 8, 8))
    assert torch.equal(rgb[:, 0], ramp[:, 0]) and torch.equal(rgb[:, 2], ramp[:, 0])
    assert torch.equal(convert_images(ramp, (1, 8, 8)), ramp)
    big = convert_images(ramp, (1, 32, 32))
    assert big.min() >= 0 and big.max() <= 1
    assert (big[0, 0, :, 1:] >= big[0, 0, :, :-1]).all()  # a ramp stays monotone
    with pytest.raises(ConfigError):
        convert_images(ramp, (2, 8, 8))


def test_limit_is_a_seeded_subset_that_keeps_derived_items_aligned() -> None:
    full, _ = items(load_split("digits", "train", seed=0))
    a, _ = items(load_split("digits", "train", seed=0, limit=50))
    b, _ = items(load_split("digits", "train", seed=0, limit=50))
    assert len(a) == 50 and torch.equal(a, b)
    assert set(hashes(a)) <= set(hashes(full))
    rot, _ = items(load_split("digits-rot90", "train", seed=0, limit=50))
    assert torch.equal(rot, torch.rot90(a, 1, dims=(-2, -1)))
    assert len(load_split("noise-uniform", "val", limit=10_000)) == 400
    with pytest.raises(ConfigError):
        load_split("digits", "train", limit=0)


# ------------------------------------------------------------------------------------ torchvision


def write_cifar(root: Path, hundred: bool, per_batch: int = 20, n_test: int = 20) -> dict[str, np.ndarray]:
    """Tiny CIFAR files in the real format: pickled dicts, data N x 3072 uint8 (R, G, B planes)."""
    rng = np.random.default_rng(0)
    k = 100 if hundred else 10
    key = "fine_labels" if hundred else "labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    out: dict[str, np.ndarray] = {}

    def dump(name: str, n: int, offset: int) -> None:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [(offset + i) % k for i in range(n)]
        entry = {"data": data, key: labels, "filenames": [f"{name}_{i}.png" for i in range(n)]}
        if hundred:
            entry["coarse_labels"] = [y // 5 for y in labels]
        with open(folder / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
        out[name] = data
        out[name + ":labels"] = np.asarray(labels)

    if hundred:
        dump("train", 5 * per_batch * 10, 0)
        dump("test", n_test * 5, 0)
        meta = {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": [f"s{i}" for i in range(20)]}
    else:
        for b in range(1, 6):
            dump(f"data_batch_{b}", per_batch, b)
        dump("test_batch", n_test, 0)
        meta = {"label_names": [f"c{i}" for i in range(10)], "num_cases_per_batch": per_batch}
    with open(folder / ("meta" if hundred else "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return out


def originals(images: np.ndarray, labels: np.ndarray) -> dict[bytes, int]:
    """CHW image bytes -> label."""
    return {img.tobytes(): int(y) for img, y in zip(images, labels)}


def check_round_trip(name: str, root: Path, train: dict[bytes, int], test: dict[bytes, int],
                     test_order: list[bytes], shape: tuple[int, int, int]) -> None:
    seen: dict[str, set[bytes]] = {}
    for split in SPLITS:
        x, y = items(load_split(name, split, root=root, seed=0))
        assert x.shape[1:] == shape and x.dtype == torch.float32
        assert x.min() >= 0 and x.max() <= 1
        back = as_uint8(x)
        assert np.allclose(back.astype(np.float32) / 255, x.numpy(), atol=1e-7)  # exact up to float rounding
        ref = test if split == "test" else train
        keys = [img.tobytes() for img in back]
        assert all(k in ref for k in keys), f"{name}/{split}: pixels do not round-trip"
        assert [ref[k] for k in keys] == y.tolist()
        seen[split] = set(keys)
        if split == "test":
            assert keys == test_order  # the official test set, in its official order
    assert seen["train"] | seen["val"] == set(train) and not seen["train"] & seen["val"]
    assert len(seen["val"]) == round(0.1 * len(train))


@pytest.mark.parametrize("hundred", [False, True])
def test_cifar_round_trip(tmp_path: Path, hundred: bool) -> None:
    out = write_cifar(tmp_path, hundred)
    name = "cifar100" if hundred else "cifar10"
    batches = ["train"] if hundred else [f"data_batch_{b}" for b in range(1, 6)]
    test_name = "test" if hundred else "test_batch"
    chw = lambda d: d.reshape(-1, 3, 32, 32)  # noqa: E731  (rows are R, G, B planes of 32 x 32)
    train = {}
    for b in batches:
        train.update(originals(chw(out[b]), out[b + ":labels"]))
    test = originals(chw(out[test_name]), out[test_name + ":labels"])
    check_round_trip(name, tmp_path, train, test, [img.tobytes() for img in chw(out[test_name])], (3, 32, 32))
    info = dataset_info(name)
    assert (info.shape, info.num_classes, info.source) == ((3, 32, 32), 100 if hundred else 10, "torchvision")


def test_svhn_round_trip_maps_label_10_to_0(tmp_path: Path) -> None:
    from scipy.io import savemat

    rng = np.random.default_rng(1)
    ref = {}
    for split, n in (("train", 40), ("test", 12)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # H x W x C x N, as published
        digit = np.arange(n) % 10
        y = np.where(digit == 0, 10, digit).astype(np.uint8)[:, None]  # N x 1, digit 0 stored as 10
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        chw = x.transpose(3, 2, 0, 1)
        ref[split] = (originals(chw, digit), [img.tobytes() for img in chw])
    check_round_trip("svhn", tmp_path, ref["train"][0], ref["test"][0], ref["test"][1], (3, 32, 32))


def write_idx(folder: Path, prefix: str, images: np.ndarray, labels: np.ndarray) -> None:
    """MNIST idx-ubyte files: big-endian magic 2051 / 2049 and dimensions, then the bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    n, h, w = images.shape
    (folder / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, h, w) + images.tobytes())
    labels_bytes = labels.astype(np.uint8).tobytes()
    (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels_bytes)


@pytest.mark.parametrize("name, folder", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST")])
def test_mnist_family_round_trip(tmp_path: Path, name: str, folder: str) -> None:
    rng = np.random.default_rng(2)
    ref = {}
    for prefix, n in (("train", 30), ("t10k", 10)):
        x = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = rng.permutation(np.arange(n) % 10)
        write_idx(tmp_path / folder / "raw", prefix, x, y)
        ref[prefix] = (originals(x[:, None], y), [img.tobytes() for img in x[:, None]])
    check_round_trip(name, tmp_path, ref["train"][0], ref["t10k"][0], ref["t10k"][1], (1, 28, 28))
    as_cifar = load_split(name, "test", root=tmp_path, shape=(3, 32, 32))
    assert as_cifar[0][0].shape == (3, 32, 32)


def test_download_flag_uses_local_files_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.svhn as tv_svhn

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("tried to download although the files are present")

    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", no_network)
    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", no_network)
    monkeypatch.setattr(tv_svhn, "download_url", no_network)
    write_cifar(tmp_path, hundred=False)
    from scipy.io import savemat

    savemat(tmp_path / "test_32x32.mat", {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((4, 1), np.uint8)})
    write_idx(tmp_path / "MNIST" / "raw", "t10k", np.zeros((3, 28, 28), np.uint8), np.arange(3))
    assert len(load_split("cifar10", "test", root=tmp_path, download=True)) == 20
    assert len(load_split("svhn", "test", root=tmp_path, download=True)) == 4
    assert len(load_split("mnist", "test", root=tmp_path, download=True)) == 3


def test_large_splits_convert_lazily_and_match_eager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, hundred=False)
    eager = load_split("cifar10", "train", root=tmp_path, shape=(1, 16, 16))
    monkeypatch.setattr(sources, "EAGER_MAX_ELEMENTS", 100)
    lazy = load_split("cifar10", "train", root=tmp_path, shape=(1, 16, 16))
    assert isinstance(eager, TensorDataset) and isinstance(lazy, sources.LazyImageDataset)
    ex, ey = items(eager)
    lx, ly = next(iter(DataLoader(lazy, batch_size=len(lazy))))  # batched through __getitems__
    assert torch.allclose(ex, lx, atol=1e-6) and torch.equal(ey, ly)
    assert torch.allclose(lazy[-1][0], ex[-1], atol=1e-6)
    with pytest.raises(IndexError):
        lazy[len(lazy)]


@pytest.mark.parametrize(
    "name, missing",
    [
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("svhn", "train_32x32.mat"),
        ("mnist", "MNIST/raw"),
        ("fashionmnist", "FashionMNIST/raw"),
    ],
)
def test_missing_files_raise_data_error_naming_the_path(tmp_path: Path, name: str, missing: str) -> None:
    with pytest.raises(DataError) as e:
        load_split(name, "train", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / missing) in msg and "--data-root" in msg
    with pytest.raises(DataError, match="--data-root"):
        load_split(name, "test", root=None)


def test_missing_single_file_is_named(tmp_path: Path) -> None:
    write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert len(load_split("cifar10", "test", root=tmp_path)) == 20  # test needs no training batch
    with pytest.raises(DataError, match=str(tmp_path / "cifar-10-batches-py" / "data_batch_3")):
        load_split("cifar10", "train", root=tmp_path)


def test_corrupt_file_raises_data_error(tmp_path: Path) -> None:
    write_cifar(tmp_path, hundred=False)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="cannot read"):
        load_split("cifar10", "test", root=tmp_path)


# ------------------------------------------------------------------------------------ image folder


def write_png(path: Path, rng: np.random.Generator, size: tuple[int, int] = (12, 20), mode: str = "RGB") -> np.ndarray:
    """A random image of (H, W) = size; returns its pixels."""
    path.parent.mkdir(parents=True, exist_ok=True)
    shape = size if mode == "L" else (*size, 3)
    arr = rng.integers(0, 256, size=shape, dtype=np.uint8)
    Image.fromarray(arr, mode=mode).save(path)
    return arr


def test_flat_folder_is_every_split_unlabelled(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    d = tmp_path / "ood"
    pixels = [write_png(d / f"img{i}.png", rng) for i in range(4)]
    write_png(d / "nested" / "deep.JPG", rng)  # found recursively, case-insensitive extension
    (d / "notes.txt").write_text("not an image")
    write_png(d / ".hidden.png", rng)
    name = f"folder:{d}"
    info = dataset_info(name)
    assert (info.shape, info.num_classes, info.source) == ((3, 12, 20), None, "folder")
    assert len(info.mean) == 3 and all(0.3 < m < 0.7 for m in info.mean)
    native, y = items(load_split(name, "test"))
    assert native.shape == (5, 3, 12, 20) and (y == -1).all()
    assert np.array_equal(as_uint8(native[0]), pixels[0].transpose(2, 0, 1))
    for split in SPLITS:
        small, _ = items(load_split(name, split, shape=(1, 8, 8)))
        assert small.shape == (5, 1, 8, 8)
    assert items(load_split(name, "val", shape=(3, 32, 32)))[0].shape == (5, 3, 32, 32)


def test_folder_converts_colour_exactly(tmp_path: Path) -> None:
    d = tmp_path / "flat"
    d.mkdir()
    Image.new("RGB", (20, 12), (255, 0, 0)).save(d / "red.png")
    Image.new("L", (5, 7), 128).save(d / "grey.png")  # grey images become 3 channels by repetition
    grey, red = items(load_split(f"folder:{d}", "test", shape=(1, 8, 8)))[0]  # sorted by file name
    assert torch.allclose(red, torch.full_like(red, 0.299), atol=1e-6)
    assert torch.allclose(grey, torch.full_like(grey, 128 / 255), atol=1e-6)
    rgb, _ = items(load_split(f"folder:{d}", "test", shape=(3, 32, 32)))
    assert torch.allclose(rgb[0], torch.full((3, 32, 32), 128 / 255), atol=1e-6)


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("shape", [(3, 9, 9), (1, 5, 7), (3, 16, 16)])
def test_folder_batched_read_is_load_image_bit_for_bit(tmp_path: Path, mixed: bool, shape: tuple) -> None:
    """FolderSource.read converts a run of 8-bit images of one size together: the same float32 values as
    load_image on each file (native size, luma + shrink, enlarge); a run with another mode or size (a 16-bit
    grey, a palette image, a larger photo) falls back to load_image one by one, with the same result."""
    from densitune.trainables.data.folder import FolderSource, load_image

    rng = np.random.default_rng(0)
    d = tmp_path / "flat"
    d.mkdir()
    for i in range(300):  # more than one read batch
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(d / f"{i:03d}.png")
    if mixed:
        Image.fromarray(rng.integers(0, 256, (9, 9), dtype=np.uint8)).save(d / "050g.png")
        Image.fromarray(rng.integers(0, 65536, (9, 9), dtype=np.uint16)).save(d / "120w.png")
        Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).convert("P").save(d / "121p.png")
        Image.fromarray(rng.integers(0, 256, (13, 11, 3), dtype=np.uint8)).save(d / "260big.png")
    paths = tuple(str(f) for f in sorted(d.glob("*.png")))
    src = FolderSource(paths, torch.full((len(paths),), -1), (3, 9, 9))
    pick = np.r_[np.arange(len(paths))[::-1][:40], np.arange(len(paths))]  # any order, repeats allowed
    got = src.read(pick, shape)
    ref = torch.stack([load_image(paths[i], shape) for i in pick])
    assert got.dtype == torch.float32 and got.shape == (len(pick), *shape)
    assert torch.equal(got, ref)


def test_folder_reads_16_bit_grey(tmp_path: Path) -> None:
    d = tmp_path / "deep"
    d.mkdir()
    Image.fromarray(np.full((6, 6), 3 * 65535 // 4, dtype=np.uint16)).save(d / "a.png")
    assert dataset_info(f"folder:{d}").shape == (1, 6, 6)
    x, _ = load_split(f"folder:{d}", "test")[0]
    assert torch.allclose(x, torch.full((1, 6, 6), 0.75), atol=1e-4)


def test_class_subfolders_give_sorted_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    d = tmp_path / "classes"
    for cls, n in (("dog", 3), ("cat", 2), ("emu", 1)):
        for i in range(n):
            write_png(d / cls / f"{i}.png", rng)
    name = f"folder:{d}"
    assert dataset_info(name).num_classes == 3
    x, y = items(load_split(name, "train", shape=(1, 8, 8)))
    assert x.shape == (6, 1, 8, 8)
    assert sorted(y.tolist()) == [0, 0, 1, 1, 1, 2]  # cat, dog, emu


def test_train_test_folders_with_held_out_val(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    d = tmp_path / "split"
    train_px = {}
    for cls in ("a", "b"):
        for i in range(10):
            px = write_png(d / "train" / cls / f"{i}.png", rng, size=(6, 6))
            train_px[px.transpose(2, 0, 1).tobytes()] = 0 if cls == "a" else 1
        write_png(d / "test" / cls / "0.png", rng, size=(6, 6))
    name = f"folder:{d}"
    assert dataset_info(name).num_classes == 2 and dataset_info(name).shape == (3, 6, 6)
    tr, va, te = (items(load_split(name, s, seed=7)) for s in SPLITS)
    assert (len(tr[1]), len(va[1]), len(te[1])) == (18, 2, 2)
    assert sorted(va[1].tolist()) == [0, 1]  # stratified
    for x, y in (tr, va):
        keys = [img.tobytes() for img in as_uint8(x)]
        assert [train_px[k] for k in keys] == y.tolist()
    assert not set(hashes(tr[0])) & set(hashes(va[0]))
    assert torch.equal(te[1], torch.tensor([0, 1]))
    assert items(load_split(name, "val", seed=7))[0].equal(va[0])
    # with a val/ folder, that folder is "val" and train/ is used whole
    write_png(d / "val" / "a" / "0.png", rng, size=(6, 6))
    write_png(d / "val" / "b" / "0.png", rng, size=(6, 6))
    assert [len(load_split(name, s)) for s in SPLITS] == [20, 2, 2]


def test_single_subfolder_counts_as_flat(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    for i in range(3):
        write_png(tmp_path / "LSUN" / "LSUN" / f"{i}.jpg", rng)
    _, y = items(load_split("folder:LSUN", "test", root=tmp_path))  # relative to the data root
    assert (y == -1).all() and dataset_info("folder:LSUN", root=tmp_path).num_classes is None


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=str(tmp_path / "nope")):
        load_split(f"folder:{tmp_path / 'nope'}", "test")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=str(tmp_path / "empty")):
        load_split(f"folder:{tmp_path / 'empty'}", "test")
    with pytest.raises(ConfigError):
        load_split("folder:", "test")


# ------------------------------------------------------------------------------------ names, errors


def test_names_and_lookup_errors() -> None:
    names = dataset_names()
    assert {"digits", "cifar10", "svhn", "mnist", "photo-patches"} <= set(names)
    assert names[-1] == "folder:PATH" and set(names[:-1]) == set(DATASETS.names())
    with pytest.raises(UnknownNameError) as e:
        load_split("imagenet", "train")
    assert "imagenet" in str(e.value) and "cifar10" in str(e.value) and "digits-blend" in str(e.value)
    with pytest.raises(UnknownNameError):
        dataset_info("imagenet")


@pytest.mark.parametrize(
    "kwargs", [{"split": "validation"}, {"split": "train", "shape": (2, 8, 8)}, {"split": "train", "seed": -1}]
)
def test_bad_arguments_raise_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        load_split("digits", **kwargs)


def test_cifar_batch_with_a_code_executing_pickle_is_refused(tmp_path):
    """A planted CIFAR batch whose pickle would run code is refused by name and never executed."""
    from densitune.errors import DataError
    from densitune.trainables.data import load_split

    write_cifar(tmp_path, hundred=False)
    marker = tmp_path / "executed"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    with pytest.raises(DataError, match="refusing to load"):
        load_split("cifar10", "train", root=tmp_path)
    assert not marker.exists()
