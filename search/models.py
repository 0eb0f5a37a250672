"""Finding trained models: checkpoints grouped by configuration, one member per seed.

A *model group* is every seed of one training configuration (backbone, D, loss, λ,
spectral norm). The search selects among groups, and reports each seed's figures
(mean ± std over seeds in the tables; the ensemble score, later, uses the group).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainables.checkpoint import CONFIG_FILE, read_config
from trainables.config import TrainConfig
from trainables.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class ModelGroup:
    """The seeds of one trained configuration."""

    key: str  # e.g. "cnn-D16-ce": TrainConfig.key without the seed
    backbone: str
    D: int
    loss: str
    lam: float
    spectral: bool
    dataset: str
    data_seed: int
    seeds: tuple[int, ...]
    checkpoints: tuple[str, ...]  # one directory per seed, same order as seeds


def group_key(config: TrainConfig) -> str:
    return config.key.rsplit("-s", 1)[0]


def discover(models_dir: str | Path) -> list[ModelGroup]:
    """Every completed checkpoint under ``models_dir`` (recursively), grouped by configuration."""
    root = Path(models_dir)
    if not root.is_dir():
        raise CheckpointError(f"models directory not found: {root}")
    members: dict[str, list[tuple[TrainConfig, Path]]] = {}
    for cfg_file in sorted(root.rglob(CONFIG_FILE)):
        meta = read_config(cfg_file.parent)
        cfg = TrainConfig.from_dict(meta["config"])
        if meta.get("epoch") != cfg.epochs:
            continue  # an unfinished model store entry cannot happen, but never search one
        members.setdefault(group_key(cfg), []).append((cfg, cfg_file.parent))
    groups = []
    for key, items in sorted(members.items()):
        items.sort(key=lambda it: it[0].seed)
        cfg = items[0][0]
        datasets = {(c.dataset, c.data_seed) for c, _ in items}
        if len(datasets) > 1:
            raise ConfigError(f"model group {key} mixes data sets / data seeds: {sorted(datasets)}")
        seeds = tuple(c.seed for c, _ in items)
        if len(set(seeds)) != len(seeds):
            raise ConfigError(f"model group {key} has two checkpoints for one seed under {root}")
        groups.append(
            ModelGroup(
                key=key, backbone=cfg.backbone, D=cfg.feature_dim, loss=cfg.loss, lam=cfg.lam,
                spectral=cfg.spectral, dataset=cfg.dataset, data_seed=cfg.data_seed,
                seeds=seeds, checkpoints=tuple(str(p) for _, p in items),
            )
        )
    if not groups:
        raise CheckpointError(f"no trained models under {root} (run `densitune train` first)")
    return groups


def select(
    groups: list[ModelGroup], dims: tuple[int, ...] = (), backbones: tuple[str, ...] = (), losses: tuple[str, ...] = ()
) -> list[ModelGroup]:
    """The groups with D in ``dims``, backbone in ``backbones``, loss in ``losses`` (empty: any).

    Asking for a value no trained model has is an error that lists what was trained.
    """
    for attr, wanted in (("D", dims), ("backbone", backbones), ("loss", losses)):
        if not wanted:
            continue
        have = sorted({getattr(g, attr) for g in groups})
        missing = [w for w in wanted if w not in have]
        if missing:
            raise ConfigError(f"no trained models with {attr} in {missing}; trained: {have}")
        groups = [g for g in groups if getattr(g, attr) in wanted]
    return groups
