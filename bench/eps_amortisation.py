"""Is the ε search at one forward pass per further ε? Cached vs uncached gradient signs, end to end.

The workload of issue 13: the ``cnn`` backbone at 32×32 on the CPU, 2,000 ID validation + 2,000 ID test
images, two OOD sets of 2,000 (one selects, one is reported), k = 8 ε values, one density (gmm_sum, score
``density``). The data are scikit-learn's embedded digits, upscaled to 32×32 and coloured, and patches of
its sample photo, written as PNG image folders (``folder:`` data sets; nothing is downloaded). One network
is trained (Ray-free loop). Then Ray starts once, and the same search (``prepare_search`` + ``run_search``,
what ``densitune search --address`` runs) goes through Ray Tune on it several times, each from its own driver
process (a Ray job, as ``densitune search`` on a cluster whose Ray is already up) with its own run folder and
cache: with the gradient-sign cache off (``SearchRun(ip_cache=False)``, what ``DENSITUNE_IP_CACHE=0`` gives
``densitune search``: every ε pays forward + backward + forward) and on (the default), in the order uncached, cached, cached, uncached, uncached,
cached (``--repeat 3``, the default: each pair reverses the order of the one before), so neither mode always goes
first. Prints each search's wall time (from its ``prepare_search`` to ``run_search``'s return, on the running
Ray), the ratio of the modes' medians (the gate), of their fastest runs (information: the runs other processes
disturbed least), Ray's start and stop on their own, the ratio of the medians with them added to both (what a
one-off ``densitune search`` that starts its own Ray pays), and every AUROC of every run. Per search it also splits
the machine's CPU seconds (``/proc``) into this driver's, Ray's own processes' (GCS, raylet, agents, monitors) and
the trial actors' (the rest): the ratio of the actors' CPU between the modes is the most the search can reach on
these cores, were the driver and Ray free and every core busy every moment.

    python bench/eps_amortisation.py [--workdir DIR] [--cpus 2] [--repeat 3] [--quick]

Gate: cached ≥ 2× faster end to end through Ray Tune, with identical AUROCs. About 2.5 minutes on 2 cores with a
--workdir of an earlier run (data and network reused), 3 from scratch. Also prints where each search's seconds
went: the Tuner's start (trial actors and their imports), the first wave of trials, the later trials;
``bench/eps_first_wave.py`` splits the first wave further. ``--quick``: a smoke run (300 / 200 images a split,
one epoch, one search per mode; its own data under DIR/quick) that checks the script end to end, not the gate.

Records (``bench/_harness.py``): eps.ratio and eps.aurocs_identical (the gate), eps.bound, eps.ratio_with_ray and
the two medians; a ``--k`` run is a diagnostic (the gate is defined at k = 8).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from _fixtures import run_search_config, search_run, started_ray, train_network, write_png_splits
from _harness import Bench, describe, machine_cpu, process_tree, processes_cpu

from densitune.results.store import read_results
from densitune.search.cache import DiskCache

EPS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05)  # k = 8 values, all > 0


@dataclass(frozen=True)
class Workload:
    """The bench's workload: image counts, training epochs, the ε values, and where its data and network live."""

    work: Path
    n_train: int = 1000
    n_eval: int = 2000
    epochs: int = 4
    eps: tuple[float, ...] = EPS
    sub: str = ""  # "quick": the smoke workload's own folder under the work dir

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        eps = EPS if args.k is None else tuple(float(f"{e:.3g}") for e in np.geomspace(0.0005, 0.05, args.k))
        if args.quick:
            return cls(Path(args.workdir), 300, 200, 1, eps, "quick")
        return cls(Path(args.workdir), eps=eps)

    @property
    def root(self) -> Path:
        return self.work / self.sub if self.sub else self.work

    @property
    def val_ood(self) -> str:
        return f"folder:{self.root}/data/ood-blend"

    @property
    def test_ood(self) -> str:
        return f"folder:{self.root}/data/ood-photo"


def search(w: Workload, name: str, cpus: int, cached: bool) -> dict:
    """One search through Ray Tune on the running Ray (this process is its driver: a Ray job); returns its wall
    time in seconds (``prepare_search`` + ``run_search``) and where they went."""
    ray_pids = ray_system_pids(os.getppid())  # the bench's Ray, found before the clock starts; read at both ends
    ray0 = processes_cpu(ray_pids)
    t0, start, cpu0, machine0 = time.perf_counter(), datetime.now(UTC), time.process_time(), machine_cpu()
    work = w.root
    _, prepared = run_search_config(dict(
        experiment=name, models=str(work / "models"), data_root=str(work / "data"), val_ood=w.val_ood,
        test_ood=[w.test_ood], densities=["gmm_sum"], scores=["density"], eps_grid=list(w.eps)),
        search_run(work / name, ip_cache=cached))
    total = time.perf_counter() - t0
    driver_cpu = time.process_time() - cpu0
    busy = [now - then for now, then in zip(machine_cpu(), machine0, strict=True)]
    ray_cpu = processes_cpu(ray_pids) - ray0
    # the trials' own spans (each row's started_at and duration_s), on the same clock as the marks
    spans = sorted({r["trial_id"]: (r["started_at"], r["duration_s"]) for r in
                    read_results(work / name / "results", stage="search").to_pylist()}.values())
    body = [((s - start).total_seconds(), (s - start).total_seconds() + d) for s, d in spans]
    first_wave_end = max(e for _, e in body[:cpus])
    last_end = max(e for _, e in body)
    before = prepared
    parts = {
        "prepare_search": before,
        "Tuner start, trial actors, imports -> first trial body": body[0][0] - before,
        "first wave (data, features, fit, signs)": first_wave_end - body[0][0],
        "later trials": last_end - first_wave_end,
        "last trial -> Tuner.fit returns": total - last_end,
        "(information) CPU seconds of this driver process (Tune's loop, Optuna)": driver_cpu,
        MACHINE_CPU: float(busy[0]),
        "(information) CPU seconds of Ray's own processes (GCS, raylet, agents, monitors)": ray_cpu,
        TRIAL_CPU: float(busy[0]) - driver_cpu - ray_cpu,
        "(information) CPU seconds stolen by the hypervisor (other machines on these cores)": float(busy[1]),
    }
    return {"seconds": total, "parts": parts}


MACHINE_CPU = "(information) CPU seconds of the whole machine (every process here)"
#: the part whose ratio between the modes bounds the gate (see ``main``)
TRIAL_CPU = "(information) CPU seconds of the trial actors (the machine less this driver and Ray's own processes)"
#: what names a process of Ray's own (not a worker: workers are titled ``ray::...``) in its command line
RAY_SYSTEM = ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "ray_client_server",
              "ray::DashboardAgent", "ray::RuntimeEnvAgent")


def ray_system_pids(root: int) -> list[int]:
    """PIDs of Ray's own long-lived processes under process ``root`` (the bench, which started this Ray): GCS,
    raylet, dashboard and its agent, runtime-env agent, log monitor, autoscaler monitor, known by their command
    lines in ``/proc``. Workers (trial actors, idle workers: ``ray::IDLE``, ``ray::ImplicitFunc``) are not, nor is
    any process of another Ray on the machine."""
    parent, command = {}, {}
    for pid, ppid, cmd in process_tree():
        parent[pid], command[pid] = ppid, cmd

    def under_root(pid: int) -> bool:
        while pid > 1:
            pid = parent.get(pid, 0)
            if pid == root:
                return True
        return False

    return [pid for pid, cmd in command.items()
            if any(name in cmd for name in RAY_SYSTEM) and not cmd.startswith(("ray::IDLE", "ray::ImplicitFunc"))
            and under_root(pid)]


def search_child(args: argparse.Namespace) -> None:
    """The driver of one search (a process of its own): joins the bench's Ray as a job of its own, so each search
    starts its own trial actors, as a ``densitune search --address`` on a running cluster does. The mode travels
    with the search (``SearchRun.ip_cache``), not in a runtime environment (which would start every worker
    through Ray's runtime-env setup, in both modes)."""
    import ray

    t0 = time.perf_counter()
    # What a driver imports once per process (Tune, Optuna) is imported before the timing, as Ray's start is.
    import optuna  # noqa: F401
    from ray import tune  # noqa: F401
    from ray.tune.search.optuna import OptunaSearch  # noqa: F401

    from densitune.run.console import quiet_ray

    quiet_ray(False)
    ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
    ready = time.perf_counter() - t0
    got = search(Workload.from_args(args), args.search_child, args.cpus, args.cached)
    got["driver_imports_connect"] = ready
    ray.shutdown()  # disconnects this job; the bench's Ray keeps running
    print("RESULT " + json.dumps(got), flush=True)


def run_child(w: Workload, args: argparse.Namespace, name: str, cached: bool, address: str) -> dict:
    shutil.rmtree(w.root / name, ignore_errors=True)
    cmd = [sys.executable, __file__, "--workdir", str(w.work), "--cpus", str(args.cpus), "--address", address,
           "--search-child", name, *(["--cached"] if cached else []), *(["--k", str(args.k)] if args.k else []),
           *(["--quick"] if args.quick else [])]
    out = subprocess.run(cmd, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        sys.exit(f"eps_amortisation: the {name} search failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def aurocs(work: Path, name: str) -> dict[tuple[float, str, str], float]:
    rows = read_results(work / name / "results", stage="search").to_pylist()
    return {(r["eps"], r["split"], r["ood_dataset"]): r["auroc"] for r in rows}


def trial_seconds(work: Path, name: str) -> list[float]:
    """Each trial's own duration (``duration_s``), in the order the trials started."""
    rows = read_results(work / name / "results", stage="search").to_pylist()
    first = {r["trial_id"]: (r["started_at"], r["duration_s"]) for r in rows}
    return [d for _, d in sorted(first.values())]


def order(repeat: int) -> list[str]:
    """uncached, cached, cached, uncached, uncached, cached, ...: each mode first as often as the other."""
    pair = ("uncached", "cached")
    return [m for r in range(repeat) for m in (pair if r % 2 == 0 else pair[::-1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default=None, help="where data, models and runs go (default: a temporary folder)")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="searches per mode, in the order uncached, cached, cached, uncached, ... (default: %(default)s)")
    ap.add_argument("--k", type=int, default=None,
                    help="diagnostic only: k log-spaced ε in [0.0005, 0.05] instead of the issue's fixed 8 (the gate is "
                         "defined at k = 8)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: small data, one epoch, one search per mode")
    ap.add_argument("--address", help=argparse.SUPPRESS)  # the bench's Ray, for a search's own driver process
    ap.add_argument("--search-child", help=argparse.SUPPRESS)
    ap.add_argument("--cached", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.k is not None and args.k < 2:
        sys.exit("eps_amortisation: error: --k must be at least 2")
    if args.search_child:
        search_child(args)
        return
    if args.repeat < 1:
        sys.exit("eps_amortisation: error: --repeat must be at least 1")
    if args.quick:
        args.repeat = 1
    temporary = args.workdir is None
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="densitune-eps-")
    w = Workload.from_args(args)
    work, eps_values = w.root, w.eps
    bench = Bench("eps_amortisation", quick=args.quick, diagnostic=args.k is not None)
    t_start = time.perf_counter()
    print(f"# eps_amortisation: {describe(bench.machine)}; work dir {work}")

    t0 = time.perf_counter()
    write_png_splits(work / "data", w.n_train, w.n_eval)  # a --workdir of an earlier run keeps its data and network
    print(f"data: ID 32x32x3 coloured digits train {w.n_train} / val {w.n_eval} / test {w.n_eval}, OOD blend "
          f"{w.n_eval} (val), photo patches {w.n_eval} (test); PNG files ready in {time.perf_counter() - t0:.1f} s")

    t0 = time.perf_counter()
    torch.set_num_threads(args.cpus)
    net = train_network(work / "models" / "bench", backbone="cnn", feature_dim=32, epochs=w.epochs, batch_size=64,
                        dataset="folder:id", data_root=str(work / "data"), experiment="bench")
    print(f"network {net.name} ready in {time.perf_counter() - t0:.1f} s")

    runs = [(f"{mode}-{order(args.repeat)[:i + 1].count(mode)}", mode) for i, mode in enumerate(order(args.repeat))]
    print(f"search: gmm_sum, score density, k = {len(eps_values)} eps values {list(eps_values)}, grid sampler, Ray "
          f"Tune on {args.cpus} CPUs (one trial per CPU); one Ray for the whole bench, each search a Ray job of its own "
          f"(own driver process, run folder and cache), in the order {', '.join(n for n, _ in runs)}", flush=True)
    got = {}
    with started_ray(args.cpus) as ray_session:
        print(f"ray.init (once, not part of any search): {ray_session.start_s:.1f} s", flush=True)
        for name, mode in runs:
            got[name] = run_child(w, args, name, mode == "cached", ray_session.address)
            print(f"{name:10s} (ip_cache={mode == 'cached'}): {got[name]['seconds']:.1f} s "
                  f"(its driver's imports and Ray connection before it, not timed: "
                  f"{got[name]['driver_imports_connect']:.1f} s; load average {os.getloadavg()[0]:.2f})", flush=True)
    ray_start, ray_stop = ray_session.start_s, ray_session.stop_s
    print(f"ray.shutdown (once, not part of any search): {ray_stop:.1f} s")

    names = [n for n, _ in runs]
    print("\nwhere each search's seconds went (its driver's clock; trial spans from the rows' started_at and duration_s):")
    print(f"| part | {' | '.join(f'{n}, s' for n in names)} |")
    print(f"|---|{'---|' * len(names)}")
    for part in got[names[0]]["parts"]:
        cells = [f"{got[n]['parts'][part]:.1f}" for n in names]
        print(f"| {part} | {' | '.join(cells)} |")
    cells = [f"**{got[n]['seconds']:.1f}**" for n in names]
    print(f"| **search** | {' | '.join(cells)} |")

    table = {n: aurocs(work, n) for n in names}
    ref = table[names[0]]
    identical = all(t == ref for t in table.values()) and len(ref) == 2 * len(eps_values)
    print(f"\n| eps | {' | '.join(f'val AUROC {n}' for n in names)} | {' | '.join(f'test AUROC {n}' for n in names)} |")
    print(f"|---|{'---|' * 2 * len(names)}")
    for eps in eps_values:
        v, t = (eps, "val", w.val_ood), (eps, "test", w.test_ood)
        cells = [f"{table[n].get(key, float('nan')):.6f}" for key in (v, t) for n in names]
        print(f"| {eps:g} | {' | '.join(cells)} |")
    per_trial = {n: trial_seconds(work, n) for n in names}
    for n, secs in per_trial.items():
        print(f"{n} trial durations, s, in start order: {' '.join(f'{d:.1f}' for d in secs)}")
    # the trials after the first wave (one per CPU) find data, features, density and signs ready
    later = {mode: statistics.median(d for n, m in runs if m == mode for d in per_trial[n][args.cpus:])
             for mode in ("uncached", "cached")}
    signs = [sum(kind == "ipsign" for kind, _ in DiskCache(work / n / "cache").events()) for n, m in runs if m == "cached"]
    print(f"\ngradient signs computed per cached search: {signs} (one per split: ID val, val OOD, ID test, test OOD)")
    med = {mode: statistics.median(got[n]["seconds"] for n, m in runs if m == mode) for mode in ("uncached", "cached")}
    ratio = med["uncached"] / med["cached"]
    best = {mode: min(got[n]["seconds"] for n, m in runs if m == mode) for mode in ("uncached", "cached")}
    with_ray = (med["uncached"] + ray_start + ray_stop) / (med["cached"] + ray_start + ray_stop)
    # The trial actors' own CPU (imports, decoding, features, signs, scoring: everything a trial process does) bounds
    # the ratio: were this driver and Ray's processes free and the cores busy every moment, each search would take
    # its actors' CPU / cpus, and the ratio would be theirs.
    trial_cpu = {mode: statistics.median(got[n]["parts"][TRIAL_CPU] for n, m in runs if m == mode)
                 for mode in ("uncached", "cached")}
    busy = {mode: statistics.median(got[n]["parts"][MACHINE_CPU] / (args.cpus * got[n]["seconds"]) for n, m in runs if m == mode)
            for mode in ("uncached", "cached")}
    ceiling = trial_cpu["uncached"] / trial_cpu["cached"]
    result = {"uncached_s": [round(got[n]["seconds"], 1) for n, m in runs if m == "uncached"],
              "cached_s": [round(got[n]["seconds"], 1) for n, m in runs if m == "cached"],
              "median_uncached_s": round(med["uncached"], 1), "median_cached_s": round(med["cached"], 1),
              "ratio": round(ratio, 2), "ratio_fastest": round(best["uncached"] / best["cached"], 2), "ray_init_s": round(ray_start, 1), "ray_shutdown_s": round(ray_stop, 1),
              "ratio_with_ray_start_stop": round(with_ray, 2), "aurocs_identical": identical, "rows": len(ref),
              "later_trial_ratio": round(later["uncached"] / later["cached"], 2),
              "trial_actor_cpu_s": {m: round(v, 1) for m, v in trial_cpu.items()}, "ceiling": round(ceiling, 2),
              "cores_busy": {m: round(v, 2) for m, v in busy.items()},
              "load_average_end": [round(x, 2) for x in os.getloadavg()],
              "gate_pass": (ratio >= 2 and identical) if args.k is None else None, "k": len(eps_values),
              "total_s": round(time.perf_counter() - t_start, 1)}
    print(json.dumps(result))
    print(f"ratio of the fastest runs (information): {best['uncached']:.1f} / {best['cached']:.1f} s = "
          f"{best['uncached'] / best['cached']:.2f}x")
    print(f"ratio with Ray's start and stop added to both ({ray_start:.1f} + {ray_stop:.1f} s, what a one-off "
          f"`densitune search` starting its own Ray pays): {with_ray:.2f}x")
    print(f"the trial actors' own CPU (every process less this driver and Ray's own), medians: uncached "
          f"{trial_cpu['uncached']:.1f}, cached {trial_cpu['cached']:.1f} CPU-s; ratio {ceiling:.2f}x = the most this "
          f"search reaches on {args.cpus} cores even with a driver and a Ray that cost nothing and every core busy "
          f"every moment (measured busy: uncached {busy['uncached']:.0%}, cached {busy['cached']:.0%} of "
          f"{args.cpus} cores)")
    verdict = ("diagnostic: the gate is defined at k = 8" if args.k is not None
               else f"gate >= 2x: {'PASS' if result['gate_pass'] else 'FAIL'}")
    print(f"ratio uncached / cached (medians of {args.repeat}, each search timed on the running Ray) = {ratio:.2f}x "
          f"at k = {len(eps_values)} ({verdict}); AUROCs identical across all {len(names)} searches: {identical}")
    bench.record("eps.ratio", ratio)
    bench.record("eps.aurocs_identical", identical)
    bench.record("eps.bound", ceiling)
    bench.record("eps.ratio_with_ray", with_ray)
    bench.record("eps.median_uncached_s", med["uncached"])
    bench.record("eps.median_cached_s", med["cached"])
    print(bench.summary())
    if temporary:
        shutil.rmtree(w.work, ignore_errors=True)
    checked_only = args.k is not None or args.quick  # a diagnostic or smoke run: the gate is not defined there
    sys.exit(0 if result["gate_pass"] or (checked_only and identical) else 1)


if __name__ == "__main__":
    main()
