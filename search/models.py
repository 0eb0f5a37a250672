"""Finding trained models: checkpoints grouped by configuration, one member per seed.

A *model group* is every seed of one training configuration: its members share every
training setting except ``seed`` (and ``experiment``, the folder they were trained into);
they are named by :func:`group_key` (backbone, D, loss, λ, spectral norm), and two
checkpoints with one name but other differing settings are an error, not one group.
The search selects among groups, and reports each seed's figures
(mean ± std over seeds in the tables; the ensemble scores use the whole group).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from densitune.errors import CheckpointError, ConfigError
from densitune.run.runstore import RunPath, glob, location
from densitune.trainables.train.checkpoint import (
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    VERSION,
    parse_config,
    read_checkpoint,
    read_config,
)
from densitune.trainables.train.config import TrainConfig

#: The training settings in which the members of one model group may differ.
MEMBER_SETTINGS = frozenset({"seed", "experiment"})


@dataclass(frozen=True)
class ModelGroup:
    """The seeds of one trained configuration."""

    key: str  # e.g. "cnn-D16-ce": TrainConfig.name (the key without seed and config hash)
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
    return config.name


def _read_entry(cfg_file: RunPath) -> tuple[TrainConfig, int]:
    """The config and epoch of one ``config.json``; :class:`CheckpointError` naming the file if foreign or corrupt."""
    cfg, epoch, _ = _read_meta(cfg_file)
    return cfg, epoch


def _read_meta(cfg_file: RunPath) -> tuple[TrainConfig, int, dict[str, Any]]:
    """:func:`_read_entry` and the metrics of the checkpoint's last epoch (``val_accuracy``...)."""
    meta = read_config(cfg_file.parent)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"not a densitune checkpoint config: {cfg_file}")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint config {cfg_file} has format version {meta.get('version')!r}, expected {VERSION}")
    cfg = parse_config(meta.get("config"), cfg_file)
    epoch = meta.get("epoch")
    if not isinstance(epoch, int) or isinstance(epoch, bool):
        raise CheckpointError(f"bad checkpoint config in {cfg_file}: epoch must be an integer, got {epoch!r}")
    metrics = meta.get("metrics")
    return cfg, epoch, metrics if isinstance(metrics, dict) else {}


def _shared_settings(cfg: TrainConfig) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if k not in MEMBER_SETTINGS}


def _check_members(key: str, items: list[tuple[TrainConfig, RunPath]]) -> None:
    """All members of group ``key`` share every setting but the seed; ConfigError naming the differing keys."""
    first_cfg, first_dir = items[0]
    ref = _shared_settings(first_cfg)
    differing: set[str] = set()
    other = None
    for cfg, d in items[1:]:
        diff = {k for k, v in _shared_settings(cfg).items() if ref.get(k) != v}
        if diff and other is None:
            other = d
        differing |= diff
    if differing:
        raise ConfigError(
            f"model group {key} mixes training configs: its checkpoints differ in {', '.join(sorted(differing))} "
            f"(e.g. {first_dir} and {other}); keep one configuration per models directory or retrain"
        )


def discover(models_dir: str | RunPath) -> list[ModelGroup]:
    """Every completed checkpoint under ``models_dir`` (recursively), grouped by configuration.

    Reads only the ``config.json`` files (see :func:`check_checkpoints` for the weights).

    Raises:
        CheckpointError: no models directory, no trained model, or a foreign / corrupt
            ``config.json`` (the message names the file).
        ConfigError: two checkpoints of one group differ in a setting other than the seed,
            or two are for one seed.
    """
    root = location(models_dir)
    if not root.is_dir():
        raise CheckpointError(f"models directory not found: {root}")
    members: dict[str, list[tuple[TrainConfig, RunPath]]] = {}
    for cfg_file in glob(root, CONFIG_FILE, recursive=True):
        cfg, epoch = _read_entry(cfg_file)
        if epoch != cfg.epochs:
            continue  # an unfinished model store entry cannot happen, but never search one
        members.setdefault(group_key(cfg), []).append((cfg, cfg_file.parent))
    groups = []
    for key, items in sorted(members.items()):
        items.sort(key=lambda it: (it[0].seed, str(it[1])))
        _check_members(key, items)
        cfg = items[0][0]
        seeds = tuple(c.seed for c, _ in items)
        if len(set(seeds)) != len(seeds):
            dup = sorted({s for s in seeds if seeds.count(s) > 1})
            raise ConfigError(f"model group {key} has two checkpoints for seed(s) {dup} under {root}")
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


def check_checkpoints(groups: list[ModelGroup]) -> None:
    """Read every checkpoint of ``groups`` (weights included), so a corrupt ``model.pt`` fails before Ray starts.

    Raises :class:`CheckpointError` naming the file: missing, truncated, foreign, or whose
    stored config disagrees with the ``config.json`` beside it.
    """
    for group in groups:
        for directory in group.checkpoints:
            d = location(directory)
            state = read_checkpoint(d)
            stored = parse_config(state.get("config"), d / MODEL_FILE)
            listed, _ = _read_entry(d / CONFIG_FILE)
            if stored != listed:
                diff = sorted(k for k, v in stored.to_dict().items() if listed.to_dict()[k] != v)
                raise CheckpointError(f"checkpoint {d / MODEL_FILE} does not match its {CONFIG_FILE} (differs in {', '.join(diff)})")
            if not isinstance(state.get("model"), dict) or not isinstance(state.get("data"), dict):
                raise CheckpointError(f"checkpoint {d / MODEL_FILE} has no weights or no data description")


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


def list_models(models_dir: str | RunPath, results_dir: str | RunPath | None = None) -> list[dict[str, Any]]:
    """One record per trained (or training) network under ``models_dir``: experiment, key, settings, epochs,
    ID validation accuracy (its last epoch's), ID test accuracy (the ``id_accuracy`` of the search rows of
    ``results_dir`` that scored this network alone; None where no search did) and the size of its weights file.

    Reads only the ``config.json`` files (and the rows' ``checkpoints`` / ``id_accuracy``); an unreadable
    config is listed with its error.
    """
    root = location(models_dir)
    if not root.is_dir():
        raise CheckpointError(f"models directory not found: {root}")
    tested = _test_accuracies(results_dir)
    out: list[dict[str, Any]] = []
    for cfg_file in glob(root, CONFIG_FILE, recursive=True):
        rel = PurePosixPath(str(cfg_file.parent)[len(str(root)):].lstrip("/")).parts
        try:
            cfg, epoch, metrics = _read_meta(cfg_file)
        except (CheckpointError, ConfigError) as e:
            out.append({"experiment": rel[0] if len(rel) > 1 else "", "key": cfg_file.parent.name, "error": str(e)})
            continue
        val = metrics.get("val_accuracy")
        weights = cfg_file.parent / MODEL_FILE
        out.append({"experiment": cfg.experiment, "key": cfg.key, "backbone": cfg.backbone, "D": cfg.feature_dim,
                    "loss": cfg.loss, "λ": None if cfg.loss == "ce" else cfg.lam, "seed": cfg.seed,
                    "epochs": f"{epoch}/{cfg.epochs}",
                    "val_accuracy": float(val) if isinstance(val, int | float) and not isinstance(val, bool) else None,
                    "test_accuracy": tested.get(_tail(str(cfg_file.parent))),
                    "size_mb": round(weights.stat().st_size / 1e6, 3) if weights.exists() else None,
                    "lr": cfg.lr, "dataset": cfg.dataset, "path": str(cfg_file.parent)})
    return out


def _tail(path: str) -> tuple[str, ...]:
    """``<experiment>/<key>`` of a network folder: how rows and the model store name one network, wherever
    the run was mounted when it was searched."""
    return PurePosixPath(path.rstrip("/")).parts[-2:]


def _test_accuracies(results_dir: str | RunPath | None) -> dict[tuple[str, ...], float]:
    """ID test accuracy per network (:func:`_tail`) from the newest search row that scored it alone."""
    from densitune.results.store import read_results, result_files

    if results_dir is None or not location(results_dir).is_dir() or not result_files(results_dir):
        return {}
    rows = read_results(results_dir, stage="search", columns=("checkpoints", "id_accuracy", "split", "started_at"))
    found: dict[tuple[str, ...], tuple[Any, float]] = {}
    for r in rows.to_pylist():
        ckpts, acc = r["checkpoints"], r["id_accuracy"]
        if r["split"] != "test" or acc is None or not ckpts or len(ckpts) != 1:
            continue
        key = _tail(ckpts[0])
        if key not in found or (r["started_at"], acc) > found[key]:
            found[key] = (r["started_at"], acc)
    return {k: acc for k, (_, acc) in found.items()}
