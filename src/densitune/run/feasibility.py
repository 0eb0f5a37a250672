"""Can any node ever run one trial? A request that no node has, and no node type can start with, is refused.

Ray queues a task or actor no node can run and waits: Tune then shows "0 running" forever. So before any trial
starts, the per-trial request (CPUs and GPUs) is compared with the shape of every node that could run it:

* every alive node (a local Ray, or a fixed cluster: nothing else will ever join);
* on an autoscaling cluster also every worker type the autoscaler may start (``max_workers`` > 0), read from the
  autoscaler's own config: the ``--autoscaling-config`` file its monitor process was started with (found through
  the cluster's GCS address among this machine's processes: the driver of ``ray job submit`` or ``ray exec``
  runs on the head), else ``~/ray_bootstrap_config.yaml`` (what ``ray up`` writes on the head).

An autoscaler that reports its node groups to the GCS (KubeRay's) is read there first. A node type whose
resources the config leaves to the provider (an AWS type without ``resources``) has an unknown shape, and a
driver that finds no autoscaler config (one not on the head) cannot know what may start: then nothing is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from densitune.errors import ConfigError
from densitune.run.files import DocumentError, read_document

log = logging.getLogger(__name__)

BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"


@dataclass(frozen=True)
class NodeShape:
    """What one node has (``resources``: Ray's names, ``CPU``, ``GPU``, ...), and where that came from."""

    name: str  # "node 10.0.0.3" or "type gpu_worker"
    resources: Mapping[str, float] | None  # None: unknown (the provider decides)
    count: int = 1  # nodes of this shape there may be at once (a type's max_workers)

    def meets(self, request: Mapping[str, float]) -> bool:
        return self.fits(request) > 0

    def fits(self, request: Mapping[str, float]) -> int:
        """How many trials asking for ``request`` one node of this shape runs at once (an unknown shape: one)."""
        if self.resources is None:
            return 1
        have = [int(self.resources.get(k, 0.0) // v + 1e-9) for k, v in request.items() if v > 0]
        return min(have) if have else 1

    def text(self, keys: Iterable[str]) -> str:
        have = self.resources or {}
        return f"{self.name}: " + ", ".join(f"{have.get(k, 0.0):g} {k}" for k in keys)


def node_types(config: Mapping[str, Any]) -> list[NodeShape]:
    """The worker types of an autoscaler config that may ever start (``max_workers`` > 0, on a cluster whose
    ``max_workers`` is not 0), each with the most nodes of it there may be at once. The head is an alive node."""
    types = config.get("available_node_types")
    if not isinstance(types, Mapping):
        return []
    head = config.get("head_node_type")
    cluster_max = config.get("max_workers")
    shapes = []
    for name, t in types.items():
        if not isinstance(t, Mapping):
            continue
        most = t.get("max_workers")
        count = int(most) if isinstance(most, int) else int(cluster_max) if isinstance(cluster_max, int) else 1
        if isinstance(cluster_max, int):
            count = min(count, cluster_max)
        if name == head or count <= 0:  # the head is one of the alive nodes; a type of no workers never starts
            continue
        res = t.get("resources")
        known = None
        if isinstance(res, Mapping) and all(isinstance(v, int | float) for v in res.values()):
            known = {str(k): float(v) for k, v in res.items()}
        shapes.append(NodeShape(f"type {name}", known, count))
    return shapes


def _cmdline(pid: str) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def monitor_config_path(gcs_address: str) -> tuple[bool, str | None]:
    """(whether this cluster's autoscaler monitor runs on this machine, its ``--autoscaling-config`` or None).

    The monitor is the process running Ray's ``monitor.py`` with ``--gcs-address=HOST:PORT``; on one machine a port
    names one GCS, so the port is compared (the driver may reach the head as 127.0.0.1 and the monitor by its IP).
    """
    port = gcs_address.rsplit(":", 1)[-1]
    proc = Path("/proc")
    if not proc.is_dir():
        return False, None
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        args = _cmdline(entry.name)
        if not any(a.endswith(("/monitor.py", "autoscaler.v2.monitor")) for a in args[:3]):
            continue
        if not any(a.startswith("--gcs-address=") and a.rsplit(":", 1)[-1] == port for a in args):
            continue
        paths = [a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")]
        return True, (os.path.expanduser(paths[0]) if paths and paths[0] else None)
    return False, None


def autoscaler_types(gcs_address: str) -> tuple[list[NodeShape] | None, str]:
    """The node types this cluster's autoscaler may start, and where they were read; None when they are unknown.

    A monitor on this machine without a config is a fixed cluster (Ray's read-only provider): no type ([]).
    """
    found, path = monitor_config_path(gcs_address)
    if found and path is None:
        return [], "a fixed cluster (its autoscaler has no config)"
    candidates = [path] if path else []
    candidates.append(os.path.expanduser(BOOTSTRAP_CONFIG))
    for candidate in candidates:
        try:
            config = read_document(candidate, "yaml")
        except FileNotFoundError:
            continue
        except DocumentError as e:
            log.warning("cannot read the autoscaler's config %s (%s); node types unknown", candidate, e)
            return None, candidate
        if isinstance(config, Mapping):
            return node_types(config), candidate
    return None, "no autoscaler config on this machine"


def gcs_types() -> list[NodeShape] | None:
    """The node groups an autoscaler reported to the GCS (KubeRay's autoscaler does), None when none did."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - a private API: its absence means "not reported"
        return None
    return group_shapes(config)


def group_shapes(config: Any) -> list[NodeShape] | None:
    """The node groups of a GCS ``ClusterConfig`` (``max_count`` -1: no limit; 0: never started); None without any."""
    if config is None or not config.node_group_configs:
        return None
    return [NodeShape(f"type {g.name}", {str(k): float(v) for k, v in g.resources.items()},
                      g.max_count if g.max_count > 0 else 1 << 20)
            for g in config.node_group_configs if g.max_count != 0]


def alive_nodes() -> list[dict[str, Any]]:
    """The cluster's alive nodes, as ``ray.nodes()`` describes them."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def _alive_shapes() -> list[NodeShape]:
    return [NodeShape(f"node {n.get('NodeManagerAddress', '?')}", {k: float(v) for k, v in n["Resources"].items()})
            for n in alive_nodes()]


def node_shapes() -> tuple[list[NodeShape], str, bool]:
    """Every alive node and every node type the autoscaler may start; where the types were read ("" when there are
    none); whether that is all (False: an autoscaler this driver cannot see may start nodes of any shape).

    A local Ray (``ray.init`` started it) is a fixed cluster: its monitor runs here without an autoscaler config.
    """
    import ray

    shapes = _alive_shapes()
    types = gcs_types()
    where = "the autoscaler's report to the GCS"
    if types is None:
        types, where = autoscaler_types(ray.get_runtime_context().gcs_address)
    if types is None:
        log.info("node types unknown (%s): a request no alive node meets waits for the autoscaler", where)
        return shapes, "", False
    return shapes + types, where if types else "", True


def check_feasible(request: Mapping[str, float]) -> None:
    """Refuse ``request`` (Ray's resource names -> amounts per trial) when no node of this Ray can ever meet it.

    Raises:
        ConfigError: one line: the request, the flags that made it, and the largest nodes and node types.
    """
    shapes, types_from, complete = node_shapes()
    problem = refusal(request, shapes, types_from) if complete else None
    if problem:
        raise ConfigError(problem)


def trial_capacity(request: Mapping[str, float]) -> int:
    """How many trials asking for ``request`` the cluster runs at once, counting the nodes the autoscaler may start
    (an autoscaling cluster's alive nodes alone would hold one trial at a time, or none, while it starts workers)."""
    shapes, _, _ = node_shapes()
    return sum(s.count * s.fits(request) for s in shapes)


def refusal(request: Mapping[str, float], shapes: list[NodeShape], types_from: str = "") -> str | None:
    """Why no node of ``shapes`` (alive nodes, and node types read from ``types_from``) can run a trial asking for
    ``request``; None when one can."""
    if any(s.meets(request) for s in shapes):
        return None
    keys = [k for k, v in request.items() if v > 0]
    flags = {"CPU": "--cpus-per-trial", "GPU": "--gpus-per-trial"}
    asked = " ".join(f"{flags.get(k, k)} {v:g}" for k, v in request.items() if v > 0)
    biggest = sorted(shapes, key=lambda s: tuple(-(s.resources or {}).get(k, 0.0) for k in keys))
    have = "; ".join(s.text(keys) for s in biggest[:2]) or "no node"
    types = f"; node types from {types_from}" if types_from else ""
    return f"{asked}: no node has, or can be started with, that much for one trial (largest: {have}{types}); ask for less"
