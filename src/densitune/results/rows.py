"""The one builder of result rows, for training epochs and search trials alike.

:func:`result_row` fills the columns every row shares (the network, the experiment, the schema's
explicit fields such as ``center_loss``) and the provenance of the process that computed it
(:func:`provenance`: node, device, numeric settings, package versions, data checksums). The
training trainable and the search trial add only their own columns.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import sys
from collections.abc import Mapping
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Protocol

import torch

from densitune.kernels import pinned
from densitune.results.store import code_version


class Network(Protocol):
    """What a row records of a trained network (a ``TrainConfig`` or a search's ``ModelGroup``)."""

    @property
    def backbone(self) -> str: ...
    @property
    def dataset(self) -> str: ...
    @property
    def loss(self) -> str: ...
    @property
    def lam(self) -> float: ...
    @property
    def spectral(self) -> bool: ...
    @property
    def data_seed(self) -> int: ...
    @property
    def D(self) -> int: ...  # noqa: N802 - the feature dimension's name in the note and the schema


@functools.lru_cache(maxsize=1)
def _versions() -> dict[str, str]:
    try:
        own = version("densitune")
    except PackageNotFoundError:  # a source tree that is not installed
        own = "0+unknown"
    return {"torch_version": torch.__version__, "densitune_version": own}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (Linux ``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def kernels(device: torch.device | str) -> dict[str, Any]:
    """What decides whether another machine gives bit-identical numbers: the CPU, the kernels torch dispatches
    to (its CPU capability, oneDNN's ISA cap), CUDA/cuDNN on a GPU and the deterministic flags (schema v5)."""

    on_gpu = str(device).startswith("cuda")
    cudnn = torch.backends.cudnn.version() if on_gpu else None  # type: ignore[no-untyped-call]
    deterministic = torch.are_deterministic_algorithms_enabled() and (not on_gpu or bool(torch.backends.cudnn.deterministic))
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL"),
        "cuda": f"{torch.version.cuda} cudnn {cudnn}" if on_gpu else None,
        "deterministic": bool(deterministic),
        "reproducible": pinned(),
    }


def node_name() -> str:
    """The Ray node id when this process runs inside Ray (Ray already imported and started), else the host name."""
    ray = sys.modules.get("ray")  # never import Ray here: the results layer does not depend on it
    if ray is not None and ray.is_initialized():
        return f"ray:{ray.get_runtime_context().get_node_id()}"
    return platform.node() or "unknown"


def device_name(device: torch.device | str) -> str:
    """``cpu``, or the GPU's name (``cuda:0 NVIDIA H100 80GB HBM3``)."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    return str(device)


def provenance(
    device: torch.device | str,
    *,
    autocast: bool = False,
    compile: bool = False,
    data_checksums: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Where and how a row's numbers were computed: the provenance columns (v4), and the kernels (v5).

    ``data_checksums`` maps ``<data set>/<split>`` to :func:`densitune.trainables.data.split_checksum`
    of every split the row's numbers depend on.
    """
    return {
        **kernels(device),
        "node": node_name(),
        "device": device_name(device),
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "autocast": bool(autocast),
        "compile": bool(compile),
        **_versions(),
        "data_checksums": json.dumps(dict(data_checksums or {}), sort_keys=True),
        "code_version": code_version(),
    }


def result_row(
    *,
    experiment: str,
    trial_id: str,
    stage: str,
    protocol: str,
    network: Network,
    started_at: datetime,
    provenance: Mapping[str, Any],
    **columns: Any,
) -> dict[str, Any]:
    """One row of the results schema: the shared columns, then the caller's own ``columns``."""
    return {
        "experiment": experiment,
        "trial_id": trial_id,
        "stage": stage,
        "protocol": protocol,
        "backbone": network.backbone,
        "id_dataset": network.dataset,
        "loss": network.loss,
        "center_loss": network.lam if network.loss != "ce" else None,  # ce has no center term
        "D": network.D,
        "spectral": network.spectral,
        "data_seed": network.data_seed,
        "started_at": started_at,
        **provenance,
        **columns,
    }
