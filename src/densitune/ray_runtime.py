"""Starting Ray: one place for ``ray.init`` and the per-trial resources.

On a laptop or CI box Ray starts locally with a bounded object store; with
``address`` (e.g. ``"auto"`` on a cluster head) it joins the running cluster.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None, *, quiet: bool = False) -> None:
    """Start or join Ray once per process (later calls are no-ops).

    ``quiet`` (``-q``): Ray's and Tune's own log lines and the workers' output are not shown;
    densitune's warnings and its one-line errors still are.
    """
    import ray

    if ray.is_initialized():
        return
    if quiet:
        _silence_ray()
    # Tune's trial workers import the project from the installed package; keep Ray quiet
    # about the things it cannot know (no dashboard is installed with ray[tune]).
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=not quiet)
    else:
        ray.init(
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=not quiet,
        )
    if quiet:  # ray.init sets up its loggers again
        _silence_ray()
    log.info("ray resources: %s", ray.cluster_resources())


def _silence_ray() -> None:
    """Drop the records of Ray's loggers (they log to their own handlers, not through densitune's)."""
    ray_log = logging.getLogger("ray")
    ray_log.setLevel(logging.CRITICAL)
    for handler in ray_log.handlers:
        handler.addFilter(lambda record: False)


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


def progress_callback(total: int, metric: str, mode: str, what: str = "trial"):
    """A Tune callback that logs one line per finished trial: done / running / pending, best, ETA."""
    import time

    from ray.tune import Callback

    class Progress(Callback):
        def __init__(self) -> None:
            self.t0 = time.monotonic()
            self.finished = 0
            self.best: tuple[float, str] | None = None

        def _line(self, trials, trial, failed: bool = False) -> None:
            self.finished += 1
            value = (trial.last_result or {}).get(metric)
            if value is not None and not failed:
                better = self.best is None or (value > self.best[0] if mode == "max" else value < self.best[0])
                if better:
                    self.best = (float(value), str(trial.config.get("point") or trial.config.get("key") or trial.trial_id))
            done = self.finished
            running = sum(t.status == "RUNNING" and t is not trial for t in trials)
            pending = max(total - done - running, 0)
            elapsed = time.monotonic() - self.t0
            eta = elapsed / done * (total - done)
            best = f"best {metric} {self.best[0]:.4f} ({self.best[1]})" if self.best else "no result yet"
            log.info("%s %d/%d done, %d running, %d pending; %s; elapsed %.0fs, ETA %.0fs%s",
                     what, done, total, running, pending, best, elapsed, eta, " (a trial FAILED)" if failed else "")

        def on_trial_complete(self, iteration, trials, trial, **info):
            self._line(trials, trial)

        def on_trial_error(self, iteration, trials, trial, **info):
            self._line(trials, trial, failed=True)

    return Progress()
