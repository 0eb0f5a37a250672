"""The training loop, readable top to bottom, with no Ray in it.

:func:`fit` yields after every epoch so the caller (the Ray Tune trainable, a test,
a script) decides what to do with each epoch: report, checkpoint, stop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from densitune.device import default_device, deterministic_if_pinned
from densitune.errors import ConfigError
from densitune.trainables.data import dataset_info, load_split, split_checksum
from densitune.trainables.data.folder import PREFIX, resolve
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


#: ``--compile`` values: ``auto`` compiles on CUDA for the backbones in :data:`COMPILE_PAYS_OFF` only.
COMPILE_MODES = ("auto", "on", "off")
#: Backbones whose CUDA training step ``bench/gpu_check.py`` measured faster under ``torch.compile`` (bf16,
#: batch 256, compile time left out); ``--compile auto`` turns it on for them. Empty until measured on a GPU.
COMPILE_PAYS_OFF: frozenset[str] = frozenset()
#: A training set is kept on the GPU when its tensors take at most this share of the free GPU memory.
RESIDENT_SHARE = 0.25


def resolve_compile(mode: str, device: torch.device, backbone: str) -> bool:
    """Whether ``--compile mode`` compiles the training step of ``backbone`` on ``device`` (auto: never on a CPU)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    return device.type == "cuda" and backbone in COMPILE_PAYS_OFF


def amp_dtype(amp: bool, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of training: bfloat16 on CUDA (float16 where the card lacks bf16), None (fp32) otherwise."""
    if not (amp and device.type == "cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def train_step(
    model: FeatureNet, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor,
    amp: torch.dtype | None = None, *, scaler: torch.amp.GradScaler | None = None,
    forward: Callable[[Tensor], tuple[Tensor, Tensor]] | None = None,
) -> tuple[Tensor, Tensor]:
    """One optimiser step on a batch x (N, C, H, W), y (N,); returns (loss, logits (N, K)).

    With ``amp`` (a dtype) the network runs under autocast in that dtype and the loss in float32
    (the center terms are sums of squares). bfloat16 has float32's range, so it needs no gradient
    scaler; a ``scaler`` guards the step for float16. ``forward`` replaces ``model.features_and_logits``
    (e.g. its ``torch.compile``-d form).
    """
    forward = forward or model.features_and_logits
    with torch.autocast(x.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
        z, logits = forward(x)
        loss = loss_fn(logits.float(), z.float(), y)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None and scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss, logits


def resident_tensors(data: Dataset, device: torch.device) -> tuple[Tensor, Tensor] | None:
    """A ``TensorDataset``'s (x (N, C, H, W), y (N,)) copied to the GPU once when they fit (at most
    :data:`RESIDENT_SHARE` of the free memory); None on a CPU or when they do not fit."""
    if device.type != "cuda" or not isinstance(data, TensorDataset) or len(data.tensors) != 2:
        return None
    x, y = data.tensors
    free, _ = torch.cuda.mem_get_info(device)
    if x.numel() * x.element_size() + y.numel() * y.element_size() > RESIDENT_SHARE * free:
        return None
    return x.to(device), y.to(device)


def resident_batches(
    x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator, drop_last: bool
) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches ``DataLoader(TensorDataset(x, y), batch_size, shuffle=True, generator=generator, drop_last)``
    gives, in the same order, indexed where the tensors live (no per-item collation, no host copies)."""
    torch.empty((), dtype=torch.int64).random_(generator=generator)  # the DataLoader's base seed draw
    order = torch.randperm(len(y), generator=generator).to(x.device)
    stop = len(y) - len(y) % batch_size if drop_last else len(y)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


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
    compile: str = "auto",
) -> Iterator[EpochState]:
    """Train ``config`` and yield an :class:`EpochState` after every epoch.

    ``resume`` is a checkpoint dict (see :mod:`densitune.trainables.train.checkpoint`); training then
    continues after its epoch with the same optimiser and schedule. Every epoch
    reseeds its shuffling from (seed, epoch), so a resumed run sees the same batches
    as an uninterrupted one.

    On CUDA (the CPU path is unchanged): channels-last memory layout, bf16 autocast when
    ``config.amp``, a training set that fits kept on the GPU (:func:`resident_batches`, the same
    batches), and ``compile`` (``auto`` | ``on`` | ``off``, :func:`resolve_compile`) to run the
    training step through ``torch.compile``. The yielded model is never the compiled wrapper.
    """
    device = device or default_device()
    deterministic_if_pinned()  # --reproducible
    data = data_description(config)
    train = load_split(config.dataset, "train", root=config.data_root, seed=config.data_seed, limit=config.train_limit)
    val = load_split(config.dataset, "val", root=config.data_root, seed=config.data_seed)

    torch.manual_seed(config.seed)
    model = build_model(config, data).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)  # what cuDNN's fastest convolutions want
    loss_fn = create_loss(
        config.loss, num_classes=data["num_classes"], feature_dim=config.feature_dim, lam=config.lam, delta=config.delta
    ).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = torch.optim.SGD(params, lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    amp = amp_dtype(config.amp, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)  # bf16 needs none
    compiled = resolve_compile(compile, device, config.backbone)
    forward = torch.compile(model.features_and_logits) if compiled else model.features_and_logits
    resident = resident_tensors(train, device)
    checksums = {f"{config.dataset}/{name}": split_checksum(split) for name, split in (("train", train), ("val", val))}
    provenance = {"device": device, "autocast": amp is not None, "compile": compiled, "data_checksums": checksums}

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
        sums = torch.zeros(2, dtype=torch.float64, device=device)  # CUDA: (loss sum, correct)
        drop_last = len(cast(Sized, train)) > config.batch_size
        batches = resident_batches(*resident, config.batch_size, g, drop_last) if resident is not None else \
            DataLoader(train, batch_size=config.batch_size, shuffle=True, generator=g, drop_last=drop_last)
        for x, y in batches:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            loss, logits = train_step(model, loss_fn, optimizer, x, y, amp, scaler=scaler, forward=forward)
            if device.type == "cuda":  # summed on the GPU: reading them every step would wait for the GPU every step
                sums = sums + torch.stack([loss.detach().double() * len(y), (logits.argmax(1) == y).sum().double()])
            else:
                total_loss += float(loss.detach()) * len(y)
                correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
        if device.type == "cuda":
            total_loss, correct = float(sums[0]), int(sums[1])
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
