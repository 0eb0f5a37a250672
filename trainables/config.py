"""The training configuration: one frozen dataclass, validated on construction.

Ray Tune needs flat dicts; :meth:`TrainConfig.to_dict` / :meth:`from_dict` convert at
that boundary and nowhere else.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from trainables.errors import ConfigError


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
        from trainables.backbones import BACKBONES
        from trainables.losses import LOSSES

        BACKBONES.check(self.backbone)
        LOSSES.check(self.loss)
        if int(self.feature_dim) <= 0:
            raise ConfigError(f"feature dimension D must be > 0, got {self.feature_dim}")
        if self.epochs <= 0:
            raise ConfigError(f"epochs must be > 0, got {self.epochs}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch size must be > 0, got {self.batch_size}")
        if self.lam < 0:
            raise ConfigError(f"lambda must be >= 0, got {self.lam}")
        if self.sn_coeff <= 0:
            raise ConfigError(f"spectral-norm coefficient must be > 0, got {self.sn_coeff}")

    @property
    def key(self) -> str:
        """A readable unique name for the trained model, used as its folder name."""
        lam = "" if self.loss == "ce" else f"-lam{self.lam:g}"
        sn = "" if self.spectral else "-nosn"
        return f"{self.backbone}-D{self.feature_dim}-{self.loss}{lam}{sn}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown training config keys: {', '.join(unknown)}")
        return cls(**dict(d))
