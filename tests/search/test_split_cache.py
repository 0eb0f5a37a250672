"""Decoded image-file splits shared between processes through the workspace's disk cache.

Concurrent trials of a search on ``folder:`` data would each decode every PNG of every split. With a cache folder,
:meth:`Workspace.data` keeps a decoded split on disk (uint8 when that gives back every value bit for bit) under its
data key and :func:`~densitune.trainables.data.split_identity` (each file's path, size and mtime), and
:func:`~densitune.search.evaluate.claim_splits` lets concurrent trials decode different splits. These tests write
real PNG folders, check bit-identical round trips against :func:`load_split`, that a changed file is decoded again,
that a held split is skipped, not waited for, and that a trial's rows equal those of a workspace without a cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import claim_while_held
from PIL import Image

from densitune.search.evaluate import Workspace, _Evaluator, _trial_splits, claim_splits
from densitune.search.models import discover, select
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.trainables.data import SplitKey, load_split, split_identity

FIGURES = ("seed", "ood_dataset", "split", "auroc", "auprc", "fpr95", "n_id", "n_ood", "id_accuracy")


def write_folder(root: Path, n: int, mode: str, size: int, seed: int, classes: bool) -> None:
    """``n`` random ``mode`` PNGs of size x size per split (train/val/test) or flat (an OOD set)."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test") if classes else ("",):
        for i in range(n):
            sub = root / split / (f"c{i % 3}" if classes else "")
            sub.mkdir(parents=True, exist_ok=True)
            shape = (size, size) if mode == "L" else (size, size, 3)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(sub / f"{i:04d}.png")


def key_of(name: str, split: str, shape: tuple[int, int, int] | None, root: Path, limit: int | None = None) -> SplitKey:
    return SplitKey(name, split, shape, str(root), 0, limit)  # what _Evaluator.split_key builds


def cached(ws: Workspace, key: SplitKey):
    return ws.data(key, *_Evaluator.split_loaders(key))


def reference(key: SplitKey):
    name, split, shape, root, seed, limit = key.as_tuple()
    return load_split(name, split, root=root, seed=seed, shape=shape, limit=limit)


def same(a, b) -> bool:
    return all(torch.equal(x, y) and x.dtype == y.dtype for x, y in zip(a.tensors, b.tensors))


@pytest.mark.parametrize(("shape", "stored"), [((3, 12, 12), "x_u8"), ((1, 7, 7), "x")])
def test_a_split_decoded_once_round_trips_bit_for_bit(tmp_path, shape, stored):
    """The first workspace decodes and stores; a second (another process, as far as the disk is concerned) reads
    it without decoding and gets load_split's tensors exactly: uint8 at the native 8-bit size, float32 after a
    resize (whose values are not k / 255)."""
    write_folder(tmp_path / "id", 20, "RGB", 12, 0, classes=True)
    key = key_of("folder:id", "val", shape, tmp_path, limit=15)
    first, second = Workspace(cache_dir=tmp_path / "cache"), Workspace(cache_dir=tmp_path / "cache")
    a = cached(first, key)
    b = cached(second, key)
    assert first.counts["load_data"] == 1 and second.counts["load_data"] == 0
    ref = reference(key)
    assert len(ref) == 15 and same(a, ref) and same(b, ref)
    (entry,) = (tmp_path / "cache" / "load_data").glob("*.pt")
    assert set(torch.load(entry, weights_only=True)) == {stored, "y"}
    assert [k for k, _ in first.disk.events()] == ["load_data"]  # type: ignore[union-attr]


def test_a_changed_file_is_decoded_again_never_served_stale(tmp_path):
    write_folder(tmp_path / "ood", 12, "L", 8, 1, classes=False)
    key = key_of("folder:ood", "test", (1, 8, 8), tmp_path)
    old = cached(Workspace(cache_dir=tmp_path / "cache"), key)
    files = sorted((tmp_path / "ood").glob("*.png"))
    item = files.index(files[5])
    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8), mode="L").save(files[5])  # same name, new pixels
    st = files[5].stat()
    os.utime(files[5], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime even on a coarse clock
    later = Workspace(cache_dir=tmp_path / "cache")
    new = cached(later, key)
    assert later.counts["load_data"] == 1  # decoded again: the identity changed with the file
    assert same(new, reference(key)) and not same(new, old)
    assert torch.equal(new.tensors[0][item], torch.full((1, 8, 8), 7 / 255))


def test_registered_sets_and_large_splits_stay_in_memory(tmp_path):
    """No identity, no disk entry: an embedded set (no files to decode), and a folder split too big to hold whole
    (load_split converts it batch by batch)."""
    assert split_identity("digits", "val") is None
    write_folder(tmp_path / "big", 3, "RGB", 8, 2, classes=False)
    assert split_identity("folder:big", "test", root=tmp_path, shape=(3, 8, 8)) is not None
    assert split_identity("folder:big", "test", root=tmp_path, shape=(3, 2048, 2048)) is None  # 3 x 12.6 M floats
    ws = Workspace(cache_dir=tmp_path / "cache")
    cached(ws, SplitKey("digits", "val", (1, 8, 8), None, 0, 50))
    assert ws.counts["load_data"] == 1 and not (tmp_path / "cache" / "load_data").exists()


@pytest.fixture(scope="module")
def group(trained_models):
    (g,) = select(discover(trained_models), (8,))  # cnn D=8 on digits, seeds 0 and 1
    return g


def test_claim_skips_a_held_split_and_the_rows_are_the_reference(group, tmp_path):
    """Folder OOD sets beside the embedded ID set: the claim pass decodes the folder splits nobody holds, skips a
    held one without waiting, and the trial (after the release) gives the rows of a workspace with no cache."""
    shape = tuple(Workspace().model(group.checkpoints[0]).data["shape"])
    mode = "L" if shape[0] == 1 else "RGB"
    for name, seed in (("blend", 3), ("noise", 4), ("photo", 5)):
        write_folder(tmp_path / "data" / name, 60, mode, shape[1], seed, classes=False)
    sp = SearchSpec(experiment="s", data_root=str(tmp_path / "data"), val_ood="folder:blend",
                    test_ood=("folder:noise", "folder:photo"), attacks=(), eps_grid=(0.01,), eval_limit=50,
                    batch_size=32, densities=("gmm_sum",))
    params = TrialParams(group.key, "density", "gmm_sum", eps=0.01)
    ckpt = [group.checkpoints[0]]
    ws = Workspace(cache_dir=tmp_path / "cache", ip_cache=True)
    ev = _Evaluator(ws, sp, ckpt, params, fit=False)
    folder_keys = [s.key for s in _trial_splits(ev, sp) if isinstance(s.key, SplitKey) and s.key.name.startswith("folder:")]
    assert [(k.name, k.split) for k in folder_keys] == [("folder:blend", "val"), ("folder:noise", "test"), ("folder:photo", "test")]
    held = folder_keys[1]
    assert ws.disk is not None
    lock_path = ws.disk._path("load_data", f"{held.token()}|{_Evaluator.split_loaders(held)[1]()}").with_suffix(".lock")
    waited, decoded = claim_while_held(lock_path, lambda: claim_splits(ws, sp, ckpt, params))
    assert not waited and decoded == [2]  # the two folder splits nobody held; digits has no disk entry
    assert ("load_data", held) not in ws._memo
    rows = run_trial(ws, sp, group, params, "t")[1]  # takes the released split itself, and seed 1's from memory
    ref = run_trial(Workspace(ip_cache=False), sp, group, params, "r")[1]
    assert [tuple(r[k] for k in FIGURES) for r in rows] == [tuple(r[k] for k in FIGURES) for r in ref]
    events = [key for kind, key in ws.disk.events() if kind == "load_data"]
    assert len(events) == len(set(events)) == 3  # each folder split decoded once, by this workspace
    other = Workspace(cache_dir=tmp_path / "cache", ip_cache=True)
    assert claim_splits(other, sp, ckpt, params) == 0 and other.counts["load_data"] == 0  # all on disk now
    assert [tuple(r[k] for k in FIGURES) for r in run_trial(other, sp, group, params, "o")[1]] == \
        [tuple(r[k] for k in FIGURES) for r in ref]
    assert other.counts["load_data"] == 3  # digits train / val / test: in memory, per process, as before
