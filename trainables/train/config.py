"""The training configuration: one frozen dataclass, validated on construction.

Ray Tune needs flat dicts; :meth:`TrainConfig.to_dict` / :meth:`from_dict` convert at
that boundary and nowhere else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from densitune.checks import Interval, check_params, check_path_component, check_path_text
from densitune.errors import ConfigError

#: An experiment name becomes a folder name and a hive partition value (``experiment=<name>``):
#: only names that need no escaping in either place.
EXPERIMENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_STR = ("backbone", "loss", "dataset", "experiment")
_INT = ("feature_dim", "seed", "epochs", "batch_size", "data_seed")
_REAL = ("lam", "delta", "lr", "weight_decay", "sn_coeff")
_BOOL = ("spectral", "amp")


_POSITIVE, _NON_NEGATIVE = [Interval(None, 0, None, closed="neither")], [Interval(None, 0, None)]
#: Ranges of the numeric settings (their types are checked first, by :meth:`TrainConfig._check_types`).
_RANGES: dict[str, list[Any]] = {
    "feature_dim": _POSITIVE, "epochs": _POSITIVE, "lr": _POSITIVE, "weight_decay": _NON_NEGATIVE,
    "batch_size": _POSITIVE, "lam": _NON_NEGATIVE, "delta": _POSITIVE, "sn_coeff": _POSITIVE,
    "train_limit": [Interval(None, 1, None), None],
}
_LABELS = {"feature_dim": "feature dimension D", "lr": "learning rate", "weight_decay": "weight decay",
           "batch_size": "batch size", "lam": "lambda", "delta": "delta (contrastive center loss constant)",
           "sn_coeff": "spectral-norm coefficient", "train_limit": "train limit"}


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


def check_experiment_name(name: object) -> str:
    """Experiment names become folder names and hive partition values: refuse any that need escaping, or
    whose derived file names no file system takes (:func:`densitune.checks.check_path_component`)."""
    if not isinstance(name, str) or not EXPERIMENT_NAME.fullmatch(name):
        shown = name if not isinstance(name, str) or len(name) <= 60 else f"{name[:40]}…"
        raise ConfigError(
            f"experiment name {shown!r} is not allowed: it names a folder and a results partition, "
            "so use letters, digits, '.', '_' and '-' only, starting with a letter or digit"
        )
    return check_path_component(name, "experiment name")


@dataclass(frozen=True)
class TrainConfig:
    """One network to train.

    ``feature_dim`` is D, the width of the projection before the classifier head
    (the research note treats D as a trained property of the network).
    """

    backbone: str = "cnn"
    feature_dim: int = 16
    loss: str = "ce"
    lam: float = 0.1  # weight of the (contrastive) center term; unused for "ce"
    delta: float = 1.0  # contrastive center loss denominator constant (Qi & Su: 1)
    seed: int = 0
    epochs: int = 15
    lr: float = 0.05
    weight_decay: float = 5e-4
    batch_size: int = 64
    spectral: bool = True  # DDU soft spectral normalisation
    sn_coeff: float = 3.0
    dataset: str = "digits"
    data_root: str | None = None
    data_seed: int = 0
    train_limit: int | None = None
    amp: bool = True  # mixed precision, used only on CUDA
    experiment: str = "default"

    def __post_init__(self) -> None:
        from densitune.trainables.nets.backbones import BACKBONES
        from densitune.trainables.nets.losses import LOSSES

        self._check_types()
        BACKBONES.check(self.backbone)
        LOSSES.check(self.loss)
        check_params(vars(self), _RANGES, labels=_LABELS)
        check_experiment_name(self.experiment)
        # The ``folder:`` training-data layout (train/ and test/ subfolders) is checked where the data is
        # prepared (densitune.trainables.train.loop.data_description), not here: loading a checkpoint re-validates its
        # config, and a folder that has moved since must not make the trained model unreadable.

    def _check_types(self) -> None:
        """Reject values of the wrong type with a ConfigError; normalise numpy scalars to Python ones."""

        def bad(name: str, what: str) -> ConfigError:
            return ConfigError(f"training config {name} must be {what}, got {getattr(self, name)!r}")

        for name in _STR:
            if not isinstance(getattr(self, name), str):
                raise bad(name, "a string")
        if self.data_root is not None and not isinstance(self.data_root, str):
            raise bad("data_root", "a string or None")
        if self.data_root is not None:
            check_path_text(self.data_root, "training config data_root")
        if self.dataset.startswith("folder:"):
            check_path_text(self.dataset[len("folder:"):], "training config dataset folder")
        for name in _INT:
            if not _is_int(getattr(self, name)):
                raise bad(name, "an integer")
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.train_limit is not None:
            if not _is_int(self.train_limit):
                raise bad("train_limit", "an integer or None")
            object.__setattr__(self, "train_limit", int(self.train_limit))
        for name in _REAL:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise bad(name, "a finite number")
            object.__setattr__(self, name, float(v))
        for name in _BOOL:
            if not _is_bool(getattr(self, name)):
                raise bad(name, "true or false")
            object.__setattr__(self, name, bool(getattr(self, name)))

    @property
    def D(self) -> int:  # noqa: N802 - the note's name of the feature dimension (as in result rows)
        return self.feature_dim

    @property
    def name(self) -> str:
        """The readable part of :attr:`key` without the seed (e.g. ``cnn-D16-ce``): a model group's name."""
        lam = "" if self.loss == "ce" else f"-lam{self.lam:g}"
        sn = "" if self.spectral else "-nosn"
        return f"{self.backbone}-D{self.feature_dim}-{self.loss}{lam}{sn}"

    @property
    def config_hash(self) -> str:
        """8 hex digits of a hash of every setting that changes the trained network (all but the
        experiment name and where the data lives)."""
        settings = {k: v for k, v in self.to_dict().items() if k not in ("experiment", "data_root")}
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]

    @property
    def key(self) -> str:
        """The trained network's identity and folder name, e.g. ``cnn-D16-ce-s0-1f3a9c2e``: readable, plus
        :attr:`config_hash`, so that another config (other epochs, lr, ...) is another network, never an overwrite."""
        return f"{self.name}-s{self.seed}-{self.config_hash}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**dict(d))
