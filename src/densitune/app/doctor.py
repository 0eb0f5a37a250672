"""``densitune doctor``: check every alive node of a cluster before any trial starts.

On each alive node (a zero-CPU Ray task pinned to it, :func:`densitune.run.ray_runtime.on_every_node`) it compares
the Python, torch, Ray and densitune versions with the driver's, checks that torch sees CUDA where the node offers
GPUs, that ``--out`` takes a probe object or file (removed at once), that ``--data-root`` is readable, and that the
node's temp folder (and a local ``--out``) has free disk. It prints a table, then one line per problem (exit 2).

The train, search and run services call :func:`preflight` when they join a cluster (``--address``), unless
``--no-doctor``. Node types of an autoscaler with no node alive yet are not seen here: a trial's own check
(:func:`densitune.run.ray_runtime.require_cuda_for_assigned_gpus`) covers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from densitune.errors import ConfigError, DensituneError
from densitune.run.failures import one_line
from densitune.run.node_probe import node_facts
from densitune.run.ray_runtime import init_ray, on_every_node

#: Less free disk than this (GB) on a node's temp folder or a local ``--out`` is a problem.
MIN_FREE_GB = 1.0
VERSIONS = ("python", "torch", "ray", "densitune")


class DoctorError(DensituneError):
    """Problems found on the cluster's nodes: one line each (the command line prints each on its own line)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(problems))


@dataclass(frozen=True, kw_only=True)
class DoctorOptions:
    address: str = "auto"  # the cluster to check
    out: str | None = None  # a run (folder or bucket) every node must be able to write
    data_root: str | None = None  # a folder every node must be able to read
    min_free_gb: float = MIN_FREE_GB
    quiet: bool = False  # no table
    verbose: bool = False


@dataclass(frozen=True)
class DoctorOutcome:
    table: str = ""
    error: DoctorError | None = None

    @property
    def status(self) -> int:
        return 0 if self.error is None else 2


def _name(node: dict[str, Any]) -> str:
    return f"{node.get('NodeManagerAddress', '?')} ({str(node.get('NodeID', ''))[:8]})"


def _gb(free: dict[str, int]) -> str:
    return f"{min(free.values()) / 1e9:.1f}" if free else "?"


def examine(out: str | None, data_root: str | None, min_free_gb: float = MIN_FREE_GB) -> tuple[str, list[str]]:
    """The table (the driver's row first, then one per alive node) and the problems, one line each. Ray must be
    initialised (joined to the cluster)."""
    driver = node_facts(None, None, 0.0)
    header = ["node", "GPUs", "python", "torch", "ray", "densitune", "CUDA", "--out", "--data-root", "free GB"]
    rows = [["driver", "-", *(driver[k] for k in VERSIONS), "-", "-", "-", _gb(driver["free"])]]
    problems: list[str] = []
    for node, facts in on_every_node(node_facts, out, data_root):
        name, gpus = _name(node), float(node.get("Resources", {}).get("GPU", 0))
        if isinstance(facts, BaseException):
            problems.append(f"node {name}: the check did not run there: {one_line(facts)}")
            rows.append([name, f"{gpus:g}", *"?" * 8])
            continue
        for key in VERSIONS:
            if facts[key] != driver[key]:
                there, here = ((f" at {facts['densitune_at']}", f" at {driver['densitune_at']}") if key == "densitune"
                               else ("", ""))
                problems.append(f"node {name}: {key} {facts[key]}{there}, but the driver runs {driver[key]}{here}")
        if gpus > 0 and not facts["cuda"]:
            problems.append(f"node {name}: offers {gpus:g} GPU(s) but torch sees no CUDA device "
                            f"({facts.get('cuda_error') or 'no GPU, or a driver too old for the pinned torch'})")
        if facts["out_error"]:
            problems.append(f"node {name}: --out {out} is not writable there: {facts['out_error']}")
        if facts["data_root_error"]:
            problems.append(f"node {name}: --data-root {data_root} is not readable there: {facts['data_root_error']}")
        for folder, free in facts["free"].items():
            if free < min_free_gb * 1e9:
                problems.append(f"node {name}: {free / 1e9:.1f} GB free in {folder} (less than {min_free_gb:g} GB)")
        rows.append([name, f"{gpus:g}", *(facts[k] for k in VERSIONS),
                     (facts["cuda"] or "NONE") if gpus > 0 else "-",
                     ("FAIL" if facts["out_error"] else "ok") if out else "-",
                     ("FAIL" if facts["data_root_error"] else "ok") if data_root else "-", _gb(facts["free"])])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                      for r in [header, *rows])
    return table, problems


def doctor(options: DoctorOptions) -> DoctorOutcome:
    """Join the cluster at ``options.address`` and check every alive node; the outcome holds the table and, when a
    node has a problem, a :class:`DoctorError` with one line per problem."""
    if not options.address:
        raise ConfigError("densitune doctor checks a cluster: pass --address (e.g. auto)")
    if options.min_free_gb < 0:
        raise ConfigError(f"--min-free-gb must be >= 0, got {options.min_free_gb:g}")
    init_ray(options.address, verbose=options.verbose, quiet=options.quiet)
    table, problems = examine(options.out, options.data_root, options.min_free_gb)
    return DoctorOutcome(table, DoctorError(problems) if problems else None)


def preflight(options: Any, data_root: str | None) -> None:
    """A service's start on a cluster (Ray already joined): the doctor's checks for its ``--out`` and data root.
    The table is printed unless ``quiet``.

    Raises:
        DoctorError: one line per problem, before any trial starts (``--no-doctor`` skips the check).
    """
    table, problems = examine(options.out, data_root)
    if not getattr(options, "quiet", False):
        print(f"densitune doctor (--no-doctor skips it)\n{table}", flush=True)
    if problems:
        raise DoctorError(problems)
