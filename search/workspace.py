"""The per-process workspace of a search: caching only.

:class:`Workspace` keeps what trials share (Ray reuses trial actors, so one process serves many
trials): each model, each data set, each (checkpoint, data set, split)'s clean features, each
(checkpoint, density, parameters) fit and each (checkpoint, attack) run, in memory and, with a
cache folder, on disk for every process (:class:`~densitune.search.cache.DiskCache`). What is
computed is :mod:`densitune.search.scoring`'s business; this module only decides when.
"""

from __future__ import annotations

import os
from collections import Counter, OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import torch
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from densitune.device import default_device, deterministic_if_pinned
from densitune.search.cache import DiskCache, checkpoint_token
from densitune.search.ood.densities import Density, density_from_state
from densitune.search.ood.density_spec import DensitySpec
from densitune.search.scoring import Features, extract_features, fit_density
from densitune.trainables.data import SplitKey, split_checksum
from densitune.trainables.train.checkpoint import LoadedModel, load_model

__all__ = ["IP_CACHE_ENV", "Workspace", "ip_cache_default", "workspace"]

#: Set to ``0`` to switch the cache of input-perturbation gradient signs off (every ε > 0 then pays
#: forward + backward + forward, the reference path). Read by the search's driver (``SearchRun.ip_cache``), which
#: hands the choice to every trial in the trial's own arguments, so it reaches Ray workers on every node.
IP_CACHE_ENV = "DENSITUNE_IP_CACHE"


class CacheKey(Protocol):
    """A hashable data key (:class:`~densitune.trainables.data.SplitKey`, or an attacked split's key) with the
    string its cache files are keyed by."""

    def token(self) -> str: ...

    def __hash__(self) -> int: ...


def ip_cache_default() -> bool:
    """Whether the gradient-sign cache is on in this process: yes unless ``DENSITUNE_IP_CACHE`` is 0/off/false/no."""
    return os.environ.get(IP_CACHE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


class Workspace:
    """Per-process caches of models, data, clean features, fitted densities and attacks.

    With ``cache_dir``, features, densities and attacked inputs also go through a
    :class:`~densitune.search.cache.DiskCache` shared by every process (Ray actors, nodes on
    shared storage), so each is computed once per search, not once per process.
    ``counts`` records what this process computed ("load_model", "load_data",
    "extract", "fit", "attack", "ipsign"); with a cache folder, a ``folder:`` split decoded by another
    process is read from disk and not counted as "load_data".

    ``ip_cache`` (default: on unless the environment sets ``DENSITUNE_IP_CACHE=0``) keeps the
    int8 sign of each input-perturbation gradient per (models, density, score, data split), so
    every further ε of the same configuration costs one forward pass (:meth:`gradient_signs`).
    Signs are held in memory up to :attr:`SIGN_MEMORY_BYTES` (least recently used go first) and,
    with a cache folder, on disk.
    """

    #: in-memory budget of the gradient-sign cache (int8: one byte per input element)
    SIGN_MEMORY_BYTES = 512 * 1024 * 1024

    def __init__(self, device: torch.device | None = None, cache_dir: str | Path | None = None,
                 ip_cache: bool | None = None) -> None:
        self.device = device or default_device()
        deterministic_if_pinned()  # --reproducible
        self.disk = DiskCache(cache_dir) if cache_dir else None
        self.ip_cache = ip_cache_default() if ip_cache is None else ip_cache
        self.counts: Counter[str] = Counter()
        self._models: dict[str, LoadedModel] = {}
        self._memo: dict[tuple, Any] = {}
        self._signs: OrderedDict[tuple, Tensor] = OrderedDict()

    def _cached(
        self,
        kind: str,
        key: tuple,
        make: Callable[[], Any],
        disk_key: str | None = None,
        codec: tuple[Callable[[Any], Any], Callable[[Any], Any]] | None = None,
    ) -> Any:
        """Memoise ``make()`` in memory, and on disk (through ``codec = (encode, decode)``) when a
        disk key is given and a cache is set."""
        mem_key = (kind, *key)
        if mem_key not in self._memo:

            def compute() -> Any:
                self.counts[kind] += 1
                return make()

            if self.disk is not None and disk_key is not None:
                # features and attacks live on the CPU; densities on the scoring device
                where = self.device if kind == "fit" else "cpu"
                encode, decode = codec or (lambda obj: obj, lambda state: state)
                self._memo[mem_key] = self.disk.get_or_create(kind, disk_key, compute, map_location=where,
                                                              encode=encode, decode=decode)
            else:
                self._memo[mem_key] = compute()
        return self._memo[mem_key]

    def model(self, checkpoint: str) -> LoadedModel:
        if checkpoint not in self._models:
            self.counts["load_model"] += 1
            self._models[checkpoint] = load_model(checkpoint, device=self.device)
        return self._models[checkpoint]

    def data(self, key: SplitKey, make: Callable[[], Dataset], identity: Callable[[], str | None] | None = None) -> Dataset:
        """The data set cached under ``key``, made by ``make()`` once.

        In memory; and, with a cache folder and an ``identity()`` (called once, on a miss: e.g.
        :func:`~densitune.trainables.data.split_identity`, which changes with the files), on disk too, so that
        processes decode a split of image files once between them (:meth:`claim_data`).
        """
        mem_key = ("load_data", key)
        if mem_key in self._memo or self.disk is None or identity is None or (ident := identity()) is None:
            return cast(Dataset, self._cached("load_data", (key,), make))
        return cast(Dataset, self._cached("load_data", (key,), make, f"{key.token()}|{ident}", _DATA_CODEC))

    def claim_data(self, key: SplitKey, make: Callable[[], Dataset], identity: Callable[[], str | None]) -> bool:
        """:meth:`data` unless another process is decoding that split right now (then nothing, and ``False``),
        or it has no disk entry to share (no cache folder, or ``identity()`` is None: ``False``, nothing loaded)."""
        mem_key = ("load_data", key)
        if mem_key in self._memo:
            return True
        if self.disk is None or (ident := identity()) is None:
            return False

        def compute() -> Dataset:
            self.counts["load_data"] += 1
            return make()

        got = self.disk.claim("load_data", f"{key.token()}|{ident}", compute, encode=_DATA_CODEC[0], decode=_DATA_CODEC[1])
        if got is None:
            return False
        self._memo[mem_key] = got[0]
        return True

    def checksum(self, key: SplitKey) -> str:
        """:func:`~densitune.trainables.data.split_checksum` of the data set loaded under ``key``, computed once."""
        mem_key = ("checksum", key)
        if mem_key not in self._memo:
            self._memo[mem_key] = split_checksum(self._memo[("load_data", key)])
        return cast(str, self._memo[mem_key])

    def loaded_data(self) -> list[SplitKey]:
        """Keys of every data set this workspace loaded."""
        return [k[1] for k in self._memo if k[0] == "load_data"]

    def attacked(self, checkpoint: str, key: CacheKey, make: Callable[[], tuple[Tensor, Tensor]]) -> Dataset:
        """Attacked inputs (x_adv, y) of one model, cached on disk."""
        codec = (lambda xy: {"x": xy[0], "y": xy[1]}, lambda s: (s["x"], s["y"]))
        x, y = self._cached("attack", (checkpoint, key), make, f"{checkpoint_token(checkpoint)}|{key.token()}", codec)
        return TensorDataset(x, y)

    def features(self, checkpoint: str, data_key: CacheKey, data: Dataset, batch_size: int = 512) -> Features:
        """Clean features of ``data`` (cached under ``data_key``) under ``checkpoint``'s model."""

        def extract() -> Features:
            return extract_features(self.model(checkpoint).model, data, batch_size, self.device)

        codec = (lambda f: {"z": f.z, "logits": f.logits, "y": f.y}, lambda s: Features(s["z"], s["logits"], s["y"]))
        return self._cached("extract", (checkpoint, data_key), extract,
                            f"{checkpoint_token(checkpoint)}|{data_key.token()}", codec)

    def density(self, checkpoint: str, spec: DensitySpec, train: Features, train_key: SplitKey | None = None) -> Density:
        """The density ``spec`` names fitted on the clean training features of ``checkpoint`` (``train_key`` names
        that split)."""

        def fit() -> Density:
            head = getattr(self.model(checkpoint).model, "head", None)  # vim needs the last layer
            wb = (head.weight, head.bias) if isinstance(head, torch.nn.Linear) else None
            return fit_density(spec, train, self.device, wb)

        split = train_key.token() if train_key is not None else "()"  # the tuple's repr, as before keys had a type
        disk_key = f"{checkpoint_token(checkpoint)}|{split}|{spec.name}|{spec.params_json()}"
        codec = (lambda d: d.state_dict(), lambda s: density_from_state(s, self.device))
        return self._cached("fit", (checkpoint, spec, train_key), fit, disk_key, codec)

    def gradient_signs(self, key: tuple, disk_key: str, make: Callable[[], Tensor]) -> Tensor:
        """(N, C, H, W) int8 gradient signs cached under ``key`` (in memory, LRU) and ``disk_key`` (on disk);
        while another process computes them, waits for its result."""
        signs = self._gradient_signs(key, disk_key, make, wait=True)
        if signs is None:  # cannot happen: waiting always ends with the signs
            raise RuntimeError(f"gradient signs {disk_key} not obtained")
        return signs

    def claim_gradient_signs(self, key: tuple, disk_key: str, make: Callable[[], Tensor]) -> bool:
        """:meth:`gradient_signs` unless another process is computing them right now (then nothing, and
        ``False``): concurrent trials each compute the splits nobody has claimed yet instead of waiting."""
        return self._gradient_signs(key, disk_key, make, wait=False) is not None

    def _gradient_signs(self, key: tuple, disk_key: str, make: Callable[[], Tensor], wait: bool) -> Tensor | None:
        if key in self._signs:
            self._signs.move_to_end(key)
            return self._signs[key]

        def compute() -> Tensor:
            self.counts["ipsign"] += 1
            return make()

        if self.disk is not None:
            codec: dict[str, Any] = dict(encode=lambda t: {"sign": t}, decode=_decode_signs)
            if wait:
                signs = self.disk.get_or_create("ipsign", disk_key, compute, **codec)
            else:
                got = self.disk.claim("ipsign", disk_key, compute, **codec)
                if got is None:
                    return None
                signs = got[0]
        else:
            signs = compute()
        self._signs[key] = signs
        while sum(t.numel() for t in self._signs.values()) > self.SIGN_MEMORY_BYTES and len(self._signs) > 1:
            self._signs.popitem(last=False)
        return signs


def _encode_data(data: Dataset) -> dict[str, Tensor]:
    """An in-memory split (x (N, C, H, W) float32 in [0, 1], y (N,)) as tensors: x as uint8 when ``x_u8 / 255``
    gives back every value bit for bit (8-bit images at their native size: a quarter of the bytes), else as is."""
    if not isinstance(data, TensorDataset) or len(data.tensors) != 2:
        raise TypeError(f"only an in-memory (x, y) TensorDataset is cached on disk, got {type(data).__name__}")
    x, y = data.tensors
    u8 = (x * 255.0).round_().clamp_(0, 255).to(torch.uint8)
    return {"x_u8": u8, "y": y} if torch.equal(_from_u8(u8), x) else {"x": x, "y": y}


def _from_u8(u8: Tensor) -> Tensor:
    return u8.float().div_(255.0)


def _decode_data(state: dict[str, Any]) -> Dataset:
    x = _from_u8(state["x_u8"]) if "x_u8" in state else state["x"]
    y = state["y"]
    if not (isinstance(x, Tensor) and isinstance(y, Tensor) and x.dtype == torch.float32 and x.dim() == 4
            and y.shape == (len(x),)):
        raise TypeError("expected x (N, C, H, W) float32 and y (N,)")
    return TensorDataset(x, y)


_DATA_CODEC = (_encode_data, _decode_data)


def _decode_signs(state: dict[str, Any]) -> Tensor:
    sign = state["sign"]
    if not isinstance(sign, Tensor) or sign.dtype != torch.int8:
        raise TypeError(f"expected an int8 tensor, got {type(sign).__name__}")
    return sign


#: One process-wide workspace, shared by the trials a reused Ray actor runs.
_WORKSPACE: Workspace | None = None


def workspace(cache_dir: str | Path | None = None, ip_cache: bool | None = None) -> Workspace:
    """The process-wide workspace (created on first use with ``cache_dir``); ``ip_cache`` (None: this process's
    :func:`ip_cache_default`) switches its gradient-sign cache for the trials that follow."""
    global _WORKSPACE
    if _WORKSPACE is None or (cache_dir and _WORKSPACE.disk is None):
        _WORKSPACE = Workspace(cache_dir=cache_dir)
    if ip_cache is not None:
        _WORKSPACE.ip_cache = ip_cache
    return _WORKSPACE
