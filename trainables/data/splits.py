"""Seeded, deterministic splitting: split names, per-purpose generators, stratified partitions, subsets.

All randomness of the data module goes through :func:`rng_for`, so that the data seed alone
fixes every split, every item order and every generated image, on any platform.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import numpy as np

from densitune.errors import ConfigError

SPLITS: tuple[str, str, str] = ("train", "val", "test")


def check_split(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS`, else :class:`ConfigError`."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return split


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator that depends only on ``seed`` and the purpose ``keys`` (e.g. "digits", "val").

    Strings are mixed in with CRC-32 rather than ``hash()``, which Python salts per process.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"data seed must be an integer >= 0, got {seed!r}")
    entropy = [int(seed), *(zlib.crc32(k.encode("utf-8")) for k in keys)]
    return np.random.default_rng(np.random.SeedSequence(entropy))


def stratified_split(labels: np.ndarray, fractions: Sequence[float], rng: np.random.Generator) -> list[np.ndarray]:
    """Partition ``range(len(labels))`` into parts of sizes ``fractions`` with every class split alike.

    Each class is shuffled by ``rng`` and spread evenly over [0, 1): its item of rank r among n
    sits at (r + u) / n, with one random offset u per class. All items are then ordered by that
    position and the order is cut at round(cumulative fraction * N). Part sizes are therefore
    exact, each class's count in a part is within one item of its share, and small classes
    still land in small parts with the right probability (plain per-class rounding would
    leave a 10 % part empty whenever every class has fewer than 10 items).

    Args:
        labels: (N,) integer labels (all -1 for unlabelled data gives a plain random split).
        fractions: the parts' shares, e.g. (0.6, 0.2, 0.2); normalised to sum 1.
        rng: the generator that fixes the shuffle.

    Returns:
        One sorted int64 index array per part; together they partition ``range(N)``.
    """
    labels = np.asarray(labels)
    fr = np.asarray(fractions, dtype=np.float64)
    if fr.ndim != 1 or len(fr) == 0 or np.any(fr < 0) or fr.sum() <= 0:
        raise ValueError(f"bad split fractions {fractions!r}")
    n = len(labels)
    order = rng.permutation(n)
    order = order[np.argsort(labels[order], kind="stable")]  # grouped by class, shuffled within
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    rank = np.arange(n) - np.repeat(starts, counts)
    offset = np.repeat(rng.random(len(counts)), counts)
    position = (rank + offset) / np.repeat(counts, counts)
    order = order[np.lexsort((rng.random(n), position))]  # by position, ties broken at random
    bounds = np.round(np.cumsum(fr / fr.sum()) * n).astype(np.int64)
    bounds[-1] = n
    return [np.sort(part).astype(np.int64) for part in np.split(order, bounds[:-1])]


def limit_positions(n: int, limit: int | None, seed: int, split: str) -> np.ndarray:
    """Sorted positions of a seeded random subset of at most ``limit`` of ``n`` items.

    The subset depends on (seed, split, n) only, so sets derived item by item from another
    (``digits`` and ``digits-rot90``) keep corresponding items under the same limit.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    if limit is None or limit >= n:
        return np.arange(n, dtype=np.int64)
    chosen = rng_for(seed, "limit", split).choice(n, size=int(limit), replace=False)
    return np.sort(chosen).astype(np.int64)
