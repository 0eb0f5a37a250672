"""The default compute device: one place, so no module hard-codes ``.cuda()``."""

from __future__ import annotations

import torch

from densitune.kernels import pinned


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def deterministic_if_pinned() -> None:
    """Under ``--reproducible`` (:func:`densitune.kernels.pinned`): deterministic algorithms only, and cuDNN's
    deterministic, non-benchmarked ones. Called where a training or a trial starts computing."""

    if pinned():
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
