"""The bench suite's harness: timers, CPU time, peak RSS, the machine, and one JSONL record per figure with its gate.

Every script in ``bench/`` asks one question and answers it with named figures. Each figure the suite gates or
shows "at a glance" is declared once, in :data:`FIGURES` (the gates in one table); a script hands its value to
:meth:`Bench.record`, which evaluates the gate and appends one JSON line to the records file:

* ``bench/results/records.jsonl``: full runs (``mode`` ``"full"``), and figures imported from runs made before the
  harness (``imported`` says from where). One file for the suite, append-only, committed; ``bench/glance.py``
  regenerates the "at a glance" table of ``bench/RESULTS.md`` from it.
* ``bench/results/quick.jsonl``: ``--quick``/smoke and diagnostic runs (``mode`` ``"quick"`` / ``"diagnostic"``),
  git-ignored; the glance table never reads them.

A record (one JSON object a line)::

    {"schema": 1, "script": "ray_overhead", "item": "ray_overhead", "name": "ray_overhead.per_trial_s",
     "label": "per trial (slope)", "value": 0.065, "unit": "s", "gate": {"op": "<=", "threshold": 0.2,
     "kind": "target"}, "passed": true, "mode": "full", "run": "ray_overhead-20261207T203000Z-4242",
     "time": "2026-12-07T20:30:00+00:00", "command": "python bench/ray_overhead.py", "machine": {...},
     "imported": null, "note": null}

``gate`` is null for a figure recorded for information (``passed`` is then null).

A new question: a script ``bench/<name>.py`` with a ``--quick`` smoke setting that builds on ``_fixtures.py``, makes
``bench = Bench("<name>", quick=args.quick)``, declares its figures in :data:`FIGURES` (and, for a new row of the
glance table, an :data:`ITEMS` entry), calls ``bench.record(name, value)`` for each and prints ``bench.summary()``;
after a full run, ``python bench/glance.py`` updates RESULTS.md.

Only the standard library here:
``gpu_check.py`` runs on a bare GPU box, and the test of this module starts neither torch nor Ray.
"""

from __future__ import annotations

import json
import math
import operator
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
RECORDS = RESULTS / "records.jsonl"  # full runs and imported figures: what the glance table reads
QUICK_RECORDS = RESULTS / "quick.jsonl"  # --quick, smoke and diagnostic runs (git-ignored)
SCHEMA = 1

# ------------------------------------------------------------------------------------------------ gates

OPS: dict[str, Callable[[Any, Any], bool]] = {
    "<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt, "==": operator.eq}


@dataclass(frozen=True)
class Gate:
    """``value OP threshold``; ``kind`` "hard" (an issue's gate) or "target" (a speed target)."""

    op: str
    threshold: float | bool
    kind: str = "hard"

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"gate operator must be one of {sorted(OPS)}, not {self.op!r}")

    def passes(self, value: float | bool) -> bool:
        """Whether ``value`` meets the gate (a NaN never does)."""
        if isinstance(value, float) and math.isnan(value):
            return False
        return bool(OPS[self.op](value, self.threshold))


@dataclass(frozen=True)
class Figure:
    """One named figure of the suite: its glance row (``item``), label, unit, printf format, gate (None: information)
    and whether the glance table shows it."""

    item: str
    label: str
    unit: str = ""
    fmt: str = ".3g"
    gate: Gate | None = None
    glance: bool = True


@dataclass(frozen=True)
class Item:
    """One row of the "at a glance" table: what is measured, by which script, and the gate or target in words."""

    what: str
    target: str


#: the rows of the "at a glance" table, in order (key -> Item)
ITEMS: dict[str, Item] = {
    "results_scale": Item("readers at 10,000 trials (`results_scale.py`)",
                          "hard: <= 3 s and <= 500 MB each, as a search leaves the store (without `densitune compact`); "
                          "faster after `compact` than one file per trial"),
    "eps_cache": Item("ε cache (`eps_amortisation.py`)", "hard: cached search >= 2× end to end, identical AUROCs"),
    "kde": Item("KDE (`peers.py`)", "hard: equal to exact scipy to 1e-6; target >= 40× scikit-learn"),
    "float32": Item("float32 scoring (`peers.py`, tests)", "hard: AUROC change < 1e-3"),
    "gmm_gemm": Item("GMM throughput / GEMM at D = 2048 (`peers.py`)", ">= 70 %"),
    "ip_scoring": Item("ip scoring (`peers.py`)", "<= 3.5× our forward; faster than MahalanobisODIN"),
    "gpu_training": Item("GPU training (`gpu_check.py`)", "ResNet-18 >= 30,000 img/s, ResNet-50 >= 12,000, bf16 never slower"),
    "ray_overhead": Item("Ray overhead (`ray_overhead.py`)", "<= 0.2 s per trial"),
    "scoring_memory": Item("scoring memory (`scoring_memory.py`)", "grows with the batch, not the data set"),
    "tpe_vs_grid": Item("TPE vs grid (`tpe_vs_grid.py`)", "median gap to the grid's best validation AUROC <= 0.005 "
                                                          "with a third of its trials"),
    "reproducible": Item("`--reproducible` (`reproducible_cost.py`)", "information: its cost on the CPU"),
    "tune_vs_grid": Item("`tune` vs a 24-network grid (`tune_vs_grid.py`)",
                         "hard: median gap to the grid's best validation objective <= 0.005, with <= 40 % of its epochs"),
}

_HARD, _TARGET = "hard", "target"

#: every figure a script records, by name: the suite's gates in one table
FIGURES: dict[str, Figure] = {
    # results_scale.py: the three readers on the layout a search leaves; compact against one file per trial
    **{f"results_scale.{cmd}_s": Figure("results_scale", f"{cmd}", "s", ".2f", Gate("<=", 3.0))
       for cmd in ("report", "best", "query")},
    "results_scale.peak_mb": Figure("results_scale", "peak of the three", "MB", ".0f", Gate("<=", 500.0)),
    "results_scale.compact_speedup": Figure("results_scale", "after compact, slowest speed-up over one file per trial",
                                            "×", ".1f", Gate(">", 1.0)),
    # eps_amortisation.py
    "eps.ratio": Figure("eps_cache", "uncached / cached (medians)", "×", ".2f", Gate(">=", 2.0)),
    "eps.aurocs_identical": Figure("eps_cache", "AUROCs identical", "", "", Gate("==", True)),
    "eps.bound": Figure("eps_cache", "bound (trial actors' CPU ratio)", "×", ".2f"),
    "eps.ratio_with_ray": Figure("eps_cache", "with Ray's start and stop", "×", ".2f", glance=False),
    "eps.median_uncached_s": Figure("eps_cache", "uncached median", "s", ".1f", glance=False),
    "eps.median_cached_s": Figure("eps_cache", "cached median", "s", ".1f", glance=False),
    # eps_first_wave.py (information: the per-input costs behind the ε bound)
    "eps_first_wave.f_us": Figure("eps_cache", "scoring forward f", "µs", ".0f", glance=False),
    "eps_first_wave.g_us": Figure("eps_cache", "forward + input gradient g", "µs", ".0f", glance=False),
    "eps_first_wave.common_ceiling_cpu_s": Figure("eps_cache", "largest common cost for 2×", "CPU-s", ".1f", glance=False),
    # peers.py
    "peers.kde_max_diff": Figure("kde", "max |diff| to exact", "nats", ".1e", Gate("<=", 1e-6)),
    "peers.kde_speedup": Figure("kde", "vs scikit-learn, per core", "×", ".0f", Gate(">=", 40.0, _TARGET)),
    "peers.float32_auroc_change": Figure("float32", "AUROC change", "", ".1e", Gate("<", 1e-3)),
    "peers.gmm_gemm_fraction": Figure("gmm_gemm", "throughput / float64 GEMM rate", "", ".0%", Gate(">=", 0.70, _TARGET)),
    "peers.ip_over_forward": Figure("ip_scoring", "ip / our forward", "×", ".2f", Gate("<=", 3.5, _TARGET)),
    "peers.ip_over_odin": Figure("ip_scoring", "ip / MahalanobisODIN", "×", ".2f", Gate("<", 1.0, _TARGET)),
    # gpu_check.py (bf16 on CUDA; the CPU smoke records as "quick")
    "gpu.resnet18_bf16_img_s": Figure("gpu_training", "ResNet-18 bf16", "img/s", ",.0f", Gate(">=", 30000.0, _TARGET)),
    "gpu.resnet50_bf16_img_s": Figure("gpu_training", "ResNet-50 bf16", "img/s", ",.0f", Gate(">=", 12000.0, _TARGET)),
    "gpu.bf16_min_speedup": Figure("gpu_training", "bf16 / fp32, slowest backbone", "×", ".2f", Gate(">=", 1.0, _TARGET)),
    # ray_overhead.py
    "ray_overhead.per_trial_s": Figure("ray_overhead", "per trial (slope)", "s", ".3f", Gate("<=", 0.2, _TARGET)),
    # scoring_memory.py
    "scoring_memory.grows_with_batch": Figure("scoring_memory", "grows with the batch", "", "", Gate("==", True)),
    "scoring_memory.flat_in_n": Figure("scoring_memory", "flat in N", "", "", Gate("==", True)),
    "scoring_memory.ip_cached_mib": Figure("scoring_memory", "ip (cached) at the largest N and batch", "MiB", ".1f"),
    # tpe_vs_grid.py
    "tpe.median_gap": Figure("tpe_vs_grid", "median gap", "", "+.4f", Gate("<=", 0.005)),
    # reproducible_cost.py (information: what the portable kernels cost)
    "reproducible.train_slowdown": Figure("reproducible", "training, pinned / native (medians)", "×", ".2f"),
    "reproducible.bit_identical": Figure("reproducible", "pinned weights bit-identical across AVX-512 / AVX2", "", ""),
    # tune_vs_grid.py: densitune tune against the exhaustive grid of the same networks (issue 25)
    "tune_vs_grid.median_gap": Figure("tune_vs_grid", "median gap", "", "+.4f", Gate("<=", 0.005)),
    "tune_vs_grid.epoch_fraction": Figure("tune_vs_grid", "tune epochs / grid epochs (median)", "", ".0%",
                                          Gate("<=", 0.40)),
    "tune_vs_grid.epoch_fraction_all_seeds": Figure("tune_vs_grid", "of the grid's epochs on all its seeds", "", ".0%",
                                                    glance=False),
    "tune_vs_grid.grid_seed_std": Figure("tune_vs_grid", "grid's seed-to-seed std", "", ".4f"),
    "tune_vs_grid.grid_test_auroc": Figure("tune_vs_grid", "test AUROC, grid's choice", "", ".4f"),
    "tune_vs_grid.tune_test_auroc": Figure("tune_vs_grid", "test AUROC, tune's choice (median)", "", ".4f"),
}


def format_value(figure: Figure, value: Any) -> str:
    """``value`` as the glance table shows it: booleans as yes/no, numbers in the figure's format, then its unit."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    text = format(value, figure.fmt) if figure.fmt else str(value)
    if not figure.unit:
        return text
    return f"{text}{figure.unit}" if figure.unit in ("×", "%") else f"{text} {figure.unit}"


# ------------------------------------------------------------------------------------------------ timing, memory


@dataclass
class Timer:
    """Wall time and this process's CPU time (user + system) between start and stop; with ``children``, also the
    CPU of the child processes that ended and were waited for in between (``RUSAGE_CHILDREN``).

    >>> with Timer() as t: ...
    >>> t.wall, t.cpu, t.children_cpu  # seconds
    """

    children: bool = False
    wall: float = 0.0
    cpu: float = 0.0
    children_cpu: float = 0.0
    _start: tuple[float, float, float] = field(default=(0.0, 0.0, 0.0), repr=False)

    def __enter__(self) -> Timer:
        self._start = (time.perf_counter(), time.process_time(), _children_cpu() if self.children else 0.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self._start[0]
        self.cpu = time.process_time() - self._start[1]
        if self.children:
            self.children_cpu = _children_cpu() - self._start[2]


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def best_of(fn: Callable[[], Any], repeat: int = 3, sync: Callable[[], None] | None = None) -> tuple[float, Any]:
    """(best wall time of ``repeat`` calls of ``fn`` in seconds, the last call's result); ``sync`` (e.g. CUDA's
    synchronize) runs before each clock read."""
    best, out = math.inf, None
    for _ in range(repeat):
        if sync:
            sync()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def mean_time(fn: Callable[[], Any], repeat: int, warmup: int = 1, sync: Callable[[], None] | None = None) -> float:
    """Mean wall seconds per call over ``repeat`` calls after ``warmup`` untimed ones (autotune, compilation)."""
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if sync:
        sync()
    return (time.perf_counter() - t0) / repeat


def thread_cpu_best(fns: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """Best thread CPU time (s) of each function over ``rounds`` interleaved rounds. The calling thread's CPU time
    does not count the time another process holds the core, so ratios of these are stable on a shared machine
    (set one torch thread around it: all the work then runs on the calling thread)."""
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - t0)
    return best


def peak_rss_mb() -> float:
    """Peak resident memory of this process, MB: Linux ``VmHWM`` (resettable by :func:`reset_peak_rss`), else the
    lifetime peak from ``getrusage``."""
    try:
        return _status_kb("VmHWM") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident memory of this process now, MB."""
    try:
        return _status_kb("VmRSS") / 1024
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Reset :func:`peak_rss_mb` to the current resident memory (``/proc/self/clear_refs``, Linux >= 4.0; a no-op
    elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _status_kb(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise KeyError(name)


@dataclass(frozen=True)
class ProcessRun:
    """A finished child process: exit code, wall and CPU seconds (user + system), peak RSS in MB, its output."""

    returncode: int
    wall: float
    cpu: float
    peak_mb: float
    stdout: str
    stderr: str


#: A small launcher between this process and the measured one. A child's peak RSS (``ru_maxrss``) counts what it held
#: before its ``exec`` (Linux keeps the forked parent's high-water mark), so a child forked from a large bench
#: process would report that bench's size: the launcher is a fresh, small interpreter that forks the command, times
#: it and reports its ``wait4`` resource usage (what ``/usr/bin/time`` does).
_LAUNCHER = """
import os, sys, time
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    except OSError as exc:
        print(f"run_process: cannot run {sys.argv[2]}: {exc}", file=sys.stderr)
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - t0
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {wall} {ru.ru_utime + ru.ru_stime} {ru.ru_maxrss}")
"""


def run_process(argv: Sequence[str], env: dict[str, str] | None = None) -> ProcessRun:
    """Run ``argv`` to the end and measure it from its own resource usage (``wait4``, through a small launcher:
    see ``_LAUNCHER``): wall seconds from its fork to its end, CPU seconds, peak RSS. No ``/usr/bin/time``."""
    with tempfile.TemporaryDirectory(prefix="bench-run-") as tmp:
        usage = Path(tmp) / "usage"
        out = subprocess.run([sys.executable, "-S", "-c", _LAUNCHER, str(usage), *argv], capture_output=True,
                             text=True, env=env)
        if not usage.is_file():
            raise RuntimeError(f"run_process: the launcher failed (exit {out.returncode}): {out.stderr[-500:]}")
        code, wall, cpu, maxrss_kb = usage.read_text().split()
    return ProcessRun(int(code), float(wall), float(cpu), int(maxrss_kb) / 1024, out.stdout, out.stderr)


# ------------------------------------------------------------------------------------------------ /proc CPU


def proc_stat(pid: int) -> list[str]:
    """The fields of ``/proc/PID/stat`` after the command name: [0] state, [1] parent PID, [11] utime, [12] stime."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def processes_cpu(pids: Sequence[int]) -> float:
    """User + system CPU seconds the processes ``pids`` have used so far (gone ones count 0)."""
    total = 0
    for pid in pids:
        try:
            fields = proc_stat(pid)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of this machine since boot (``/proc/stat``): busy = user + nice + system + irq +
    softirq (every process here); steal = what the hypervisor gave other machines while this one wanted to run."""
    f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    return (f[0] + f[1] + f[2] + f[5] + f[6]) / tick, f[7] / tick


def process_tree() -> Iterator[tuple[int, int, str]]:
    """(pid, parent pid, command line) of every process this user can read in ``/proc``."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(proc_stat(int(entry))[1])
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            yield int(entry), parent, cmd


# ------------------------------------------------------------------------------------------------ machine


def machine() -> dict[str, Any]:
    """This machine: host, CPU model, cores, memory, Python, the versions of torch, Ray and densitune (from the
    installed metadata: nothing is imported), the GPU's name where torch is already imported and sees one, and
    the load average."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1)
    except (ValueError, OSError):
        mem_gb = None
    gpu = None
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    return {"host": platform.node(), "cpu": cpu_model, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "python": platform.python_version(), **{name: _version(name) for name in ("torch", "ray", "densitune")},
            "gpu": gpu, "load_average": [round(x, 2) for x in os.getloadavg()]}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def describe(m: dict[str, Any]) -> str:
    """One line for a script's header."""
    return (f"{m['host']}: {m['cores']} cores ({m['cpu']}), {m['memory_gb']} GB, GPU {m['gpu'] or 'none'}; "
            f"torch {m['torch']}, Ray {m['ray']}, densitune {m['densitune']}, Python {m['python']}; "
            f"load average {' '.join(f'{x:.2f}' for x in m['load_average'])}")


# ------------------------------------------------------------------------------------------------ records


def make_record(name: str, value: Any, *, script: str, run: str, mode: str = "full", command: str = "",
                machine_info: dict[str, Any] | None = None, when: datetime | None = None, imported: str | None = None,
                note: str | None = None) -> dict[str, Any]:
    """The JSON record of figure ``name`` (a key of :data:`FIGURES`) with its gate evaluated."""
    if name not in FIGURES:
        raise KeyError(f"no figure {name!r} in bench/_harness.py FIGURES: declare it (item, label, unit, gate) there")
    if mode not in ("full", "quick", "diagnostic"):
        raise ValueError(f"mode must be full, quick or diagnostic, not {mode!r}")
    fig = FIGURES[name]
    if hasattr(value, "item"):  # numpy / torch scalars
        value = value.item()
    gate = fig.gate
    return {"schema": SCHEMA, "script": script, "item": fig.item, "name": name, "label": fig.label, "value": value,
            "unit": fig.unit,
            "gate": None if gate is None else {"op": gate.op, "threshold": gate.threshold, "kind": gate.kind},
            "passed": None if gate is None else gate.passes(value), "mode": mode, "run": run,
            "time": (when or datetime.now(UTC)).isoformat(timespec="seconds"), "command": command,
            "machine": machine_info if machine_info is not None else machine(), "imported": imported, "note": note}


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Append ``records`` to the JSONL file ``path`` (one line each; the folder is made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False, allow_nan=True) + "\n")


def read_records(path: Path) -> list[dict[str, Any]]:
    """Every record of the JSONL file ``path`` (none if it does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Bench:
    """One run of a bench script: its machine, command, run id and mode, and :meth:`record` for its figures.

    ``quick`` (a smoke setting) and ``diagnostic`` (a setting the gates are not defined at) write to
    :data:`QUICK_RECORDS`, full runs to :data:`RECORDS`; ``records`` overrides the file.
    """

    def __init__(self, script: str, *, quick: bool = False, diagnostic: bool = False, records: Path | None = None,
                 argv: Sequence[str] | None = None) -> None:
        self.script = script
        self.mode = "quick" if quick else "diagnostic" if diagnostic else "full"
        self.path = records or (RECORDS if self.mode == "full" else QUICK_RECORDS)
        self.machine = machine()
        self.started = datetime.now(UTC)
        self.run = f"{script}-{self.started.strftime('%Y%m%dT%H%M%SZ')}-{os.getpid()}"
        args = sys.argv[1:] if argv is None else argv
        self.command = shlex.join(["python", f"bench/{script}.py", *args])
        self.timer = Timer(children=True).__enter__()
        self.recorded: list[dict[str, Any]] = []

    def record(self, name: str, value: Any, note: str | None = None) -> dict[str, Any]:
        """Record figure ``name`` = ``value`` (appended at once, so a later crash keeps it); returns the record."""
        rec = make_record(name, value, script=self.script, run=self.run, mode=self.mode, command=self.command,
                          machine_info=self.machine, note=note)
        append_records(self.path, [rec])
        self.recorded.append(rec)
        return rec

    def passed(self) -> bool:
        """Whether every gated figure recorded so far met its gate."""
        return all(r["passed"] is not False for r in self.recorded)

    def summary(self) -> str:
        """One line: the run's figures against their gates, wall and CPU time so far, peak RSS, where they went."""
        self.timer.__exit__()
        gated = [r for r in self.recorded if r["passed"] is not None]
        failed = [r["name"] for r in gated if not r["passed"]]
        verdict = f"{len(gated) - len(failed)}/{len(gated)} gates met" + (f" (not met: {', '.join(failed)})" if failed else "")
        return (f"bench {self.script} [{self.mode}]: {len(self.recorded)} figures, {verdict}; wall {self.timer.wall:.1f} s, "
                f"CPU {self.timer.cpu:.1f} s (+ children {self.timer.children_cpu:.1f} s), peak RSS "
                f"{peak_rss_mb():.0f} MB; records in {self.path}")
