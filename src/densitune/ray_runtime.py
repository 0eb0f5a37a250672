"""Starting Ray: one place for ``ray.init`` and the per-trial resources.

On a laptop or CI box Ray starts locally with a bounded object store; with
``address`` (e.g. ``"auto"`` on a cluster head) it joins the running cluster.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool = False) -> None:
    """Start or join Ray once per process (later calls are no-ops).

    Without ``verbose`` Ray and Tune keep quiet on the console: worker output stays in
    Ray's session logs (densitune's own lines go to the run's log file) and Ray logs
    warnings only (see :func:`densitune.console.quiet_ray`).
    """
    import ray

    from densitune.console import quiet_ray

    quiet_ray(verbose)
    if ray.is_initialized():
        return
    # Tune's trial workers import the project from the installed package; keep Ray quiet
    # about the things it cannot know (no dashboard is installed with ray[tune]).
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    level = logging.INFO if verbose else logging.ERROR
    if address:
        ray.init(address=address, log_to_driver=verbose, logging_level=level)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=verbose,
            logging_level=level,
        )
    log.info("ray resources: %s", ray.cluster_resources())


def trial_resources(cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None) -> dict[str, float]:
    """Resources for one trial: a GPU (or the given fraction) when the cluster has GPUs, else CPUs only."""
    import ray

    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    res = {"cpu": float(cpus_per_trial)}
    if gpus_per_trial > 0:
        res["gpu"] = float(gpus_per_trial)
    return res


def trial_slots(resources: dict[str, float]) -> int:
    """How many trials with ``resources`` fit on the cluster at once.

    Tune keeps only one trial pending when a search algorithm suggests the configs,
    so short trials run nearly one at a time unless max_concurrent_trials is set.
    """
    import ray

    have = ray.cluster_resources()
    slots = [int(have.get(k.upper(), 0) // v) for k, v in resources.items() if v > 0]
    return max(1, min(slots)) if slots else 1


def progress_callback(total: int, metric: str, mode: str, what: str = "trial", show: bool = True):
    """A Tune callback showing one live progress bar (done / running / failed, best, ETA) and
    logging one line per finished trial to the run's log (see :mod:`densitune.console`)."""
    from densitune.console import Progress
    from densitune.console import progress_callback as callback

    return callback(Progress(total, what, metric, mode, enabled=show), metric)
