"""Starting Ray: one place for ``ray.init`` and the per-trial resources.

On a laptop or CI box Ray starts locally with a bounded object store; with
``address`` (e.g. ``"auto"`` on a cluster head) it joins the running cluster.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from densitune.checks import error_summary
from densitune.errors import ConfigError
from densitune.run.cleanup import new_session_marker
from densitune.run.console import Progress, quiet_ray
from densitune.run.console import progress_callback as _progress_callback
from densitune.run.failures import FATAL_KEY
from densitune.run.feasibility import alive_nodes, check_feasible, trial_capacity
from densitune.run.node_probe import FAKE_GPU_ENV  # test-only: fake (declared) GPUs run on the CPU (README)

log = logging.getLogger(__name__)


def _session_token() -> None:
    """Keep Ray's token authentication without writing ``~/.ray/auth_token``: a local Ray that densitune starts
    gets a fresh random token in this process's environment (inherited by every Ray process it starts), unless
    the user chose a token, disabled token authentication, or already has a token file."""
    if any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return
    if (Path.home() / ".ray" / "auth_token").exists():
        return
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)


#: Credentials Ray Tune copies from the driver's environment into every trial's runtime env
#: (``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE``). A runtime env is logged by every node's
#: runtime_env_agent and served by the state API: credentials reach trials through each node's own environment,
#: instance role or AWS configuration instead.
TUNE_COPIED_CREDENTIALS = frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN",
                                     "AWS_SESSION_TOKEN"})


def keep_credentials_out_of_runtime_envs() -> None:
    """Stop Ray Tune's copy of AWS credentials into its trials' runtime env (only that copy: the other variables it
    propagates still travel). A local Ray and its trials inherit this process's environment anyway."""
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - TUNE_COPIED_CREDENTIALS


def init_ray(address: str | None = None, num_cpus: int | None = None, *, verbose: bool = False,
             quiet: bool = False, env_vars: dict[str, str] | None = None) -> None:
    """Start or join Ray once per process (later calls are no-ops).

    Without ``address`` an isolated local instance is started (``address="local"``), even
    when another Ray runs on the machine (a plain ``ray.init()`` would join that one);
    ``address="auto"`` (or ``host:port``) joins a running cluster.

    Without ``verbose`` Ray and Tune keep quiet on the console: worker output stays in
    Ray's session logs (densitune's own lines go to the run's log file) and Ray logs
    warnings only (see :func:`densitune.run.console.quiet_ray`); ``quiet`` (``-q``) hides those too:
    densitune's warnings and its one-line errors still show. ``env_vars`` (already in this process's environment
    for a local Ray, whose processes inherit it) reach a cluster's trial processes through the job's runtime
    environment.
    """
    import ray

    quiet_ray(verbose)
    keep_credentials_out_of_runtime_envs()
    if ray.is_initialized():
        return
    if quiet:
        _silence_ray()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    level = logging.INFO if verbose else logging.ERROR
    if address:
        # a cluster's workers already run: settings every trial process needs (--reproducible) travel in the job's
        # runtime environment (never credentials: those come from each node's own environment or role)
        env_vars = {**(env_vars or {}), **{k: v for k in (FAKE_GPU_ENV,) if (v := os.environ.get(k))}}  # test-only
        runtime_env: dict[str, Any] | None = {"env_vars": dict(env_vars)} if env_vars else None
        ray.init(address=address, log_to_driver=verbose, logging_level=level, runtime_env=runtime_env)
        log.info("joined the Ray cluster at %s: %d node(s), resources %s", address, len(alive_nodes()),
                 ray.cluster_resources())
    else:
        _session_token()
        new_session_marker()  # every process of this Ray carries it: `densitune clean` signals only those
        ray.init(
            address="local",
            num_cpus=num_cpus or os.cpu_count() or 1,
            include_dashboard=False,
            object_store_memory=256 * 1024 * 1024,
            log_to_driver=verbose,
            logging_level=level,
        )
        log.info("started a local Ray: resources %s", ray.cluster_resources())
    if quiet:  # ray.init sets up its loggers again
        _silence_ray()


def _silence_ray() -> None:
    """Drop the records of Ray's loggers (they log to their own handlers, not through densitune's)."""
    ray_log = logging.getLogger("ray")
    ray_log.setLevel(logging.CRITICAL)
    for handler in ray_log.handlers:
        handler.addFilter(lambda record: False)


def trial_resources(cpus_per_trial: float = 1.0, gpus_per_trial: float | None = None) -> dict[str, float]:
    """Resources for one trial, requested (not guessed), checked against what a node has or can start with
    (:func:`densitune.run.feasibility.check_feasible`; the services call this once right after Ray starts).

    ``gpus_per_trial=None`` (a local run only: :func:`densitune.run.resource_flags.check_resource_flags` refuses it with
    an address) means one GPU per trial when this machine has GPUs, else none.

    Raises:
        ConfigError: no node has, and no node type can start with, the CPUs and GPUs of one trial.
    """
    import ray

    if gpus_per_trial is None:
        gpus_per_trial = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    check_feasible({"CPU": float(cpus_per_trial), "GPU": float(gpus_per_trial)})
    res = {"cpu": float(cpus_per_trial)}
    if gpus_per_trial > 0:
        res["gpu"] = float(gpus_per_trial)
    return res


def require_cuda_for_assigned_gpus() -> None:
    """Inside a trial: if Ray gave it a GPU, torch must see CUDA. Never train on the CPU of a (billed) GPU node
    silently: the trial fails fatally, in one line naming the node (a retry would repeat it).

    Raises:
        ConfigError: the trial holds GPUs but no CUDA device is usable here (and ``DENSITUNE_TEST_FAKE_GPU`` is unset).
    """
    import ray

    gpus = ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0)
    if gpus <= 0 or os.environ.get(FAKE_GPU_ENV) == "1":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"node {ray.util.get_node_ip_address()}: given {gpus:g} GPU(s) but torch sees no CUDA "
                          f"device (no GPU, or a driver too old for CUDA {torch.version.cuda}); not run on its CPU")


def on_every_node(fn: Any, *args: Any, timeout_s: float = 300.0) -> list[tuple[dict[str, Any], Any]]:
    """Run ``fn(*args, gpus=<the node's GPUs>)`` once on every alive node (a zero-CPU task pinned to it) and return
    ``(node, result)`` pairs; ``result`` is the exception where the task failed. ``fn``'s module is shipped by value,
    so a node with another densitune install (or none) runs the driver's code (:mod:`densitune.run.node_probe`).
    A node that left while it was asked (an autoscaler scaling an idle worker down: its task is unschedulable, or
    the node died or is no longer alive) is left out: it has nothing left to check, and a trial never lands there."""
    import ray
    from ray import cloudpickle
    from ray.exceptions import NodeDiedError, TaskUnschedulableError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    cloudpickle.register_pickle_by_value(sys.modules[fn.__module__])
    task = ray.remote(num_cpus=0, max_retries=0)(fn)
    nodes = alive_nodes()
    refs = [task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(*args, gpus=float(n["Resources"].get("GPU", 0))) for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out: list[tuple[dict[str, Any], Any]] = []
    for node, ref in zip(nodes, refs, strict=True):
        if ref not in ready:
            out.append((node, TimeoutError(f"no answer within {timeout_s:g} s")))
            ray.cancel(ref, force=True)
            continue
        try:
            out.append((node, ray.get(ref)))
        except Exception as e:  # noqa: BLE001 - the node's failure is its result
            out.append((node, e))
    alive = {n["NodeID"] for n in alive_nodes()}
    left = [node for node, result in out if isinstance(result, Exception)
            and (isinstance(result, (TaskUnschedulableError, NodeDiedError)) or node["NodeID"] not in alive)]
    for node in left:
        log.info("node %s left the cluster while it was checked; not checked", node.get("NodeManagerAddress"))
    return [(node, result) for node, result in out if node not in left]


def trial_slots(resources: dict[str, float]) -> int:
    """How many trials with ``resources`` fit on the cluster at once: on every alive node and on every node the
    autoscaler may start (:func:`densitune.run.feasibility.trial_capacity`).

    Tune keeps only one trial pending when a search algorithm suggests the configs,
    so short trials run nearly one at a time unless max_concurrent_trials is set.
    """
    return max(1, trial_capacity({k.upper(): v for k, v in resources.items()}))


def compaction_callback(rolling: Any, files_of: Any):
    """A Tune callback handing the files of each trial that finished (``files_of(trial)``: the names it wrote
    them under) to ``rolling``, a :class:`densitune.results.store.RollingCompaction` of the experiment
    the driver holds the writer lock of. A failed merge is a warning; the trial files then stay as they are."""
    from ray.tune import Callback

    class _Compact(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if (trial.last_result or {}).get(FATAL_KEY):  # a fatal trial wrote no rows
                return
            try:
                for name in files_of(trial):
                    rolling.finished(name)
            except Exception as e:  # noqa: BLE001 - merging is housekeeping: it must never stop a run
                log.warning("%s: merging finished trials' result files failed, they stay one file per trial: %s",
                            rolling.experiment, error_summary(e))
                rolling.every = 0

    return _Compact()


def progress_callback(total: int, metric: str, mode: str, what: str = "trial", show: bool = True):
    """A Tune callback showing one live progress bar (done / running / failed, best, ETA) and
    logging one line per finished trial to the run's log (see :mod:`densitune.run.console`)."""
    return _progress_callback(Progress(total, what, metric, mode, enabled=show), metric)
