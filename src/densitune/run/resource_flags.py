"""Checks of the resource flags (``--num-cpus``, ``--cpus-per-trial``, ``--gpus-per-trial``, ``--seeds``,
``--max-concurrent``, ``--max-gpu-hours``), done before Ray starts: Ray would otherwise read ``num_cpus=0``
as "all CPUs", start and then die on a trial that asks for 0 CPUs, or accept a negative seed.

On a cluster (``--address``) the GPUs per trial must be explicit: an autoscaling cluster shows no GPU
until a GPU trial asks for one, so guessing from what happens to be up would put every trial on the
CPU head.

Standard library only, so a bad flag fails in well under a second.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

from densitune.errors import ConfigError


def _number(flag: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{flag} must be a finite number, got {str(value)[:40]}")
    return float(value)


def check_positive(flag: str, value: Any, *, whole: bool = False) -> None:
    """``value`` (when given) is a finite number > 0, and a whole number with ``whole``."""
    if value is None:
        return
    v = _number(flag, value)
    if v <= 0:
        raise ConfigError(f"{flag} must be > 0, got {str(value)[:40]}")
    if whole and v != int(v):
        raise ConfigError(f"{flag} must be a whole number, got {str(value)[:40]}")


def check_gpus_per_trial(value: Any) -> None:
    """GPUs per trial: 0 (none), a fraction in (0, 1] (trials share a GPU) or a whole number of GPUs."""
    if value is None:
        return
    v = _number("--gpus-per-trial", value)
    if v < 0 or (v > 1 and v != int(v)):
        raise ConfigError(f"--gpus-per-trial must be 0, a fraction in (0, 1] or a whole number of GPUs, got {str(value)[:40]}")


def check_seeds(flag: str, seeds: Sequence[Any] | None) -> None:
    """Seeds are integers >= 0 (NumPy and the data split refuse negative ones)."""
    for s in seeds or ():
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"{flag} must be integers >= 0, got {str(s)[:40]}")


def check_local_cpus(args: Any) -> None:
    """A local Ray (no ``--address``) is one node of ``--num-cpus`` (default: every CPU of this machine): a trial
    asking for more would wait forever, so it is refused before Ray starts (a cluster's nodes are checked once
    Ray runs, :func:`densitune.run.feasibility.check_feasible`)."""
    cpus = getattr(args, "cpus_per_trial", None)
    if getattr(args, "address", None) or cpus is None:
        return
    have = getattr(args, "num_cpus", None) or os.cpu_count() or 1
    if cpus > have:
        source = "--num-cpus" if getattr(args, "num_cpus", None) else "this machine's CPUs"
        raise ConfigError(f"--cpus-per-trial {cpus:g}: no node has, or can be started with, that much for one trial "
                          f"(the local Ray has {have:g} CPU(s): {source}); ask for less")


def check_resource_flags(args: Any) -> None:
    """Every resource flag an ``argparse`` namespace has (absent ones are skipped)."""
    check_positive("--num-cpus", getattr(args, "num_cpus", None), whole=True)
    check_positive("--cpus-per-trial", getattr(args, "cpus_per_trial", None))
    check_gpus_per_trial(getattr(args, "gpus_per_trial", None))
    if getattr(args, "address", None) and getattr(args, "gpus_per_trial", 0) is None:
        raise ConfigError("with --address (a cluster) pass --gpus-per-trial explicitly (e.g. 1, 0.25, or 0 for CPU-only trials)")
    check_local_cpus(args)
    check_positive("--max-gpu-hours", getattr(args, "max_gpu_hours", None))
    check_positive("--max-concurrent", getattr(args, "max_concurrent", None), whole=True)
    check_seeds("--seeds", getattr(args, "seeds", None))
    seed = getattr(args, "seed", None)
    check_seeds("--seed", [seed] if seed is not None else None)
