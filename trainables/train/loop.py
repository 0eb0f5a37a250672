"""The training loop, readable top to bottom, with no Ray in it.

:func:`fit` yields after every epoch so the caller (the Ray Tune trainable, a test,
a script) decides what to do with each epoch: report, checkpoint, stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from densitune.device import default_device
from densitune.errors import ConfigError
from densitune.trainables.data import dataset_info, load_split, split_checksum
from densitune.trainables.nets.losses import create_loss
from densitune.trainables.train.checkpoint import build_model
from densitune.trainables.train.config import TrainConfig

if TYPE_CHECKING:
    from densitune.trainables.nets.backbones import FeatureNet

log = logging.getLogger(__name__)


def check_training_folder(config: TrainConfig) -> None:
    """A ``folder:`` data set trained on must have ``train/`` and ``test/`` subfolders.

    Without them every split is the whole folder (that layout is for OOD sets), so the same
    images would train, select and test the model. Checked here, where training data is
    prepared, and not in :class:`TrainConfig`: a checkpoint re-validates its config when
    loaded, and must stay loadable after its training folder has moved.
    """
    from densitune.trainables.data.folder import PREFIX, resolve

    path = config.dataset[len(PREFIX):] if config.dataset.startswith(PREFIX) else ""
    if not path.strip():
        return  # not a folder set, or one without a path (dataset_info says so)
    directory = resolve(path, config.data_root)
    if not directory.is_dir():
        return  # dataset_info says the data is not there (DataError)
    missing = [s for s in ("train", "test") if not (directory / s).is_dir()]
    if missing:
        raise ConfigError(
            f"cannot train on {config.dataset!r}: {directory} has no {' or '.join(s + '/' for s in missing)} subfolder; "
            "a training folder needs train/ and test/ subfolders, otherwise the same images would be used for "
            "training, selection and test"
        )


def data_description(config: TrainConfig) -> dict[str, Any]:
    """What the model needs to know of its training data: shape, classes, normalisation.

    Raises :class:`ConfigError` for data that cannot be trained on (no labels; a ``folder:``
    set without ``train/`` and ``test/``), :class:`DataError` for data that is not there.
    """
    check_training_folder(config)
    info = dataset_info(config.dataset, root=config.data_root)
    if not info.num_classes:
        raise ConfigError(f"data set {config.dataset!r} has no labels and cannot be trained on")
    return {
        "name": info.name,
        "shape": list(info.shape),
        "num_classes": int(info.num_classes),
        "mean": list(info.mean),
        "std": list(info.std),
        "data_seed": config.data_seed,
    }


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, device: torch.device, batch_size: int = 512) -> float:
    """Top-1 accuracy of ``model`` on a labelled data set."""
    model.eval()
    correct = total = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        pred = model(x.to(device)).argmax(1).cpu()
        correct += int((pred == y).sum())
        total += len(y)
    return correct / max(total, 1)


def train_step(
    model: FeatureNet, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    x: Tensor, y: Tensor, use_amp: bool,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a batch x (N, C, H, W), y (N,); returns (loss, logits (N, K)).

    Under AMP the network runs in half precision, the loss in float32 (the center terms
    are sums of squares that overflow in float16), and the gradient scaler guards the step.
    """
    with torch.autocast(x.device.type, enabled=use_amp):
        z, logits = model.features_and_logits(x)
        loss = loss_fn(logits.float(), z.float(), y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


@dataclass
class EpochState:
    """Everything after one epoch: metrics for reporting, objects for checkpointing."""

    epoch: int  # 1-based
    train_loss: float
    train_accuracy: float
    val_accuracy: float
    seconds: float
    model: nn.Module
    loss: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    data: dict[str, Any]
    #: the v4 provenance of these numbers: device, mixed precision, checksums of the train/val splits
    provenance: dict[str, Any]

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "epoch": self.epoch,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "val_accuracy": self.val_accuracy,
        }


def fit(
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    resume: dict[str, Any] | None = None,
) -> Iterator[EpochState]:
    """Train ``config`` and yield an :class:`EpochState` after every epoch.

    ``resume`` is a checkpoint dict (see :mod:`densitune.trainables.train.checkpoint`); training then
    continues after its epoch with the same optimiser and schedule. Every epoch
    reseeds its shuffling from (seed, epoch), so a resumed run sees the same batches
    as an uninterrupted one.
    """
    device = device or default_device()
    data = data_description(config)
    train = load_split(config.dataset, "train", root=config.data_root, seed=config.data_seed, limit=config.train_limit)
    val = load_split(config.dataset, "val", root=config.data_root, seed=config.data_seed)

    torch.manual_seed(config.seed)
    model = build_model(config, data).to(device)
    loss_fn = create_loss(
        config.loss, num_classes=data["num_classes"], feature_dim=config.feature_dim, lam=config.lam, delta=config.delta
    ).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    use_amp = config.amp and device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    checksums = {f"{config.dataset}/{name}": split_checksum(split) for name, split in (("train", train), ("val", val))}
    provenance = {"device": device, "autocast": use_amp, "data_checksums": checksums}

    start = 0
    if resume is not None:
        model.load_state_dict(resume["model"])
        loss_fn.load_state_dict(resume["loss"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        start = int(resume["epoch"])
        log.info("resuming %s after epoch %d", config.key, start)

    for epoch in range(start + 1, config.epochs + 1):
        t0 = time.perf_counter()
        model.train()
        loss_fn.train()
        g = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        total_loss = 0.0
        correct = seen = 0
        for x, y in DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=g, drop_last=len(cast(Sized, train)) > config.batch_size):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss, logits = train_step(model, loss_fn, optimizer, scaler, x, y, use_amp)
            total_loss += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        scheduler.step()
        if not torch.isfinite(torch.tensor(total_loss)):
            raise FloatingPointError(f"{config.key}: training loss became {total_loss} at epoch {epoch}; lower the learning rate")
        state = EpochState(
            epoch=epoch,
            train_loss=total_loss / max(seen, 1),
            train_accuracy=correct / max(seen, 1),
            val_accuracy=accuracy(model, val, device),
            seconds=time.perf_counter() - t0,
            model=model,
            loss=loss_fn,
            optimizer=optimizer,
            scheduler=scheduler,
            data=data,
            provenance=provenance,
        )
        log.info("%s epoch %d/%d loss %.4f val acc %.4f", config.key, epoch, config.epochs, state.train_loss, state.val_accuracy)
        yield state
