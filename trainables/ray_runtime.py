"""Starting Ray: one place for ``ray.init`` and the per-trial resources.

On a laptop or CI box Ray starts locally with a bounded object store; with
``address`` (e.g. ``"auto"`` on a cluster head) it joins the running cluster.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Start or join Ray once per process (later calls are no-ops)."""
    import ray

    if ray.is_initialized():
        return
    # Tune's trial workers import the project from the installed package; keep Ray quiet
    # about the things it cannot know (no dashboard is installed with ray[tune]).
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=True,
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
