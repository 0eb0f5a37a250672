"""Checkpoints: weights, loss state (centers) and the config that made them, in one file.

A checkpoint directory holds ``model.pt`` (a dict of tensors and plain values, loaded
with ``weights_only=True``) and ``config.json`` (the same config, readable without
torch, used to list trained models quickly). Files are written atomically: each to a temporary
file unique to its writer, fsynced, then renamed over the old one.
"""

from __future__ import annotations

import json
import pickle
import re
import zipfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from densitune.checks import error_summary
from densitune.errors import CheckpointError, DensituneError
from densitune.run.files import DocumentError, load_tensors, read_document
from densitune.run.runstore import RunPath, location, publish
from densitune.trainables.nets.backbones import SpectralConfig, create_model
from densitune.trainables.train.config import TrainConfig

if TYPE_CHECKING:
    from densitune.trainables.nets.backbones import FeatureNet

FORMAT = "densitune-checkpoint"
VERSION = 1
MODEL_FILE = "model.pt"
CONFIG_FILE = "config.json"


def save_checkpoint(
    directory: str | RunPath,
    *,
    config: TrainConfig,
    model: nn.Module,
    loss: nn.Module,
    data: dict[str, Any],
    epoch: int,
    metrics: dict[str, float],
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
) -> RunPath:
    """Write ``directory/model.pt`` and ``directory/config.json``; returns the directory.

    ``data`` describes the training data the model expects: ``shape`` (C, H, W),
    ``num_classes``, ``mean``, ``std``.
    """
    d = location(directory)
    d.mkdir(parents=True, exist_ok=True)
    state = {
        "format": FORMAT,
        "version": VERSION,
        "config": config.to_dict(),
        "data": dict(data),
        "epoch": int(epoch),
        "metrics": {k: float(v) for k, v in metrics.items()},
        "model": model.state_dict(),
        "loss": loss.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    publish(d / MODEL_FILE, lambda f: torch.save(state, f))
    meta = {k: state[k] for k in ("format", "version", "config", "data", "epoch", "metrics")}
    publish(d / CONFIG_FILE, json.dumps(meta, indent=1, sort_keys=True))
    return d


def read_checkpoint(directory: str | RunPath, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The raw checkpoint dict; :class:`CheckpointError` if missing, corrupt or foreign."""
    path = location(directory)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = load_tensors(path, map_location)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():  # never repeat PyTorch's advice to load it unsafely
            if "GLOBAL" in str(e):  # a pickle asking for code: refused, never executed
                raise CheckpointError(f"refused checkpoint {path}: {_unsafe_reason(e)}") from None
            raise CheckpointError(f"corrupt checkpoint {path}: not a file of tensors and plain values") from None
        raise CheckpointError(f"corrupt checkpoint {path}: {error_summary(e)}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise CheckpointError(f"corrupt checkpoint {path}: {error_summary(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"not a densitune checkpoint: {path}")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}, expected {VERSION}")
    return state


def _unsafe_reason(e: BaseException) -> str:
    """Why a weights-only load refused a file, without PyTorch's advice to load it unsafely."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    what = f" ({found.group(1)[:80]})" if found else ""
    return (f"it asks to run or build a Python object{what}, which a checkpoint of tensors and plain values never does; "
            "densitune does not load such files")


def parse_config(d: Any, source: str | RunPath) -> TrainConfig:
    """The :class:`TrainConfig` a checkpoint stores; :class:`CheckpointError` naming ``source`` if it is invalid.

    A config that no longer validates (an unknown key or backbone, a bad value) makes the
    file unusable, whatever the reason: the message names the file and the first problem.
    """
    if not isinstance(d, dict):
        raise CheckpointError(f"bad checkpoint config in {source}: expected a dict of training settings, got {type(d).__name__}")
    try:
        return TrainConfig.from_dict(d)
    except DensituneError as e:
        raise CheckpointError(f"bad checkpoint config in {source}: {error_summary(e)}") from None
    except (TypeError, ValueError) as e:  # defensive: validation should have raised ConfigError
        raise CheckpointError(f"bad checkpoint config in {source}: {type(e).__name__}: {error_summary(e)}") from None


@dataclass
class LoadedModel:
    """A trained network ready for scoring, with what it was trained on."""

    model: FeatureNet
    config: TrainConfig
    data: dict[str, Any]
    metrics: dict[str, float]
    path: RunPath
    centers: torch.Tensor | None


def build_model(config: TrainConfig, data: dict[str, Any]) -> FeatureNet:
    """The (untrained) network a config describes, for data of ``data['shape']``."""
    c, h, _ = data["shape"]
    return create_model(
        config.backbone,
        in_channels=c,
        image_size=h,
        num_classes=data["num_classes"],
        feature_dim=config.feature_dim,
        mean=tuple(data["mean"]),
        std=tuple(data["std"]),
        spectral=SpectralConfig(coeff=config.sn_coeff) if config.spectral else None,
    )


def load_model(directory: str | RunPath, device: str | torch.device = "cpu") -> LoadedModel:
    """Rebuild the network of a checkpoint in eval mode on ``device``."""
    state = read_checkpoint(directory)
    config = parse_config(state.get("config"), location(directory) / MODEL_FILE)
    model = build_model(config, state["data"])
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {directory} does not fit its own config: {error_summary(e)}") from None
    model.to(device).eval()
    centers = state["loss"].get("centers") if state.get("loss") else None
    return LoadedModel(model, config, state["data"], state["metrics"], location(directory), centers)


def read_config(directory: str | RunPath) -> dict[str, Any]:
    """The ``config.json`` beside a checkpoint (no torch load); :class:`CheckpointError` if missing or unreadable.

    Only JSON is checked here; see :func:`parse_config` for its ``config`` entry.
    """

    p = location(directory) / CONFIG_FILE
    try:
        info = read_document(p)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint config not found: {p}") from None
    except DocumentError as e:
        raise CheckpointError(f"corrupt checkpoint config {p}: {e}") from None
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint config {p}: {e.strerror or error_summary(e)}") from None
    if not isinstance(info, dict):
        raise CheckpointError(f"not a densitune checkpoint config: {p}")
    return info
