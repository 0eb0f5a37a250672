"""Results at scale: `report`, `best` and `query` over 10,000 search trials, in the layout a search leaves,
with one file per trial, and after `compact`.

Writes a run folder through the real writer (``store.write_rows``, rows built by ``rows.result_row`` as a
search trial builds them: 2 seeds x (1 validation + 6 test rows) = 14 rows per trial, one file per trial,
plus 120 training-epoch files) and times each reading command as its own process (wall time; CPU seconds and
peak RSS of the process, ``_harness.run_process``) on three layouts of the same rows:

1. one file per trial (what a search wrote before it merged as it ran; a reference, not gated);
2. as a search leaves it: the files merged every ``COMPACT_EVERY`` finished trials by the same
   ``RollingCompaction`` the search's driver runs (``densitune.search.tune.compaction_callback``);
3. after ``densitune compact`` (one file per experiment).

Only the readers are timed. Gate (issue 13): each command <= 3 s and <= 500 MB on 2 cores on the layout a
search leaves (no ``densitune compact``), and faster after ``compact`` than with one file per trial.

    python bench/results_scale.py [--trials 10000] [--out /tmp/dt-scale] [--keep] [--quick]

``--quick``: 300 trials, one run per command (a smoke run). Records results_scale.{report,best,query}_s and .peak_mb
(as a search leaves it) and .compact_speedup (the slowest command's speed-up after compact over one file per trial).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from _harness import FIGURES, Bench, describe, run_process

from densitune.results.store import COMPACT_EVERY, RollingCompaction

GATE_S = FIGURES["results_scale.report_s"].gate.threshold  # type: ignore[union-attr]
GATE_MB = FIGURES["results_scale.peak_mb"].gate.threshold  # type: ignore[union-attr]
SCORES = ["density", "diff", "msp", "entropy", "gradnorm"]
DENSITIES = {"gmm_sum": '{"jitter": 1e-06}', "gmm_max": '{"jitter": 1e-06}', "kde": '{"bandwidth": "scott"}'}
EPS = [0.0, 0.005, 0.01, 0.02, 0.05]
TEST_SETS = ["digits-rot90", "digits-hflip", "photo-patches", "noise-uniform", "adv-fgsm", "adv-bim"]


@dataclass(frozen=True)
class Net:
    """What a row records of a network (the ``rows.Network`` protocol)."""

    backbone: str
    dataset: str
    loss: str
    lam: float
    spectral: bool
    data_seed: int
    D: int  # noqa: N815 - the schema's column name


def trial_rows(i: int) -> list[dict]:
    """The 14 rows of search trial ``i`` (deterministic pseudo-random metrics)."""
    from densitune.results.rows import provenance, result_row

    net = Net("cnn", "digits", ["ce", "contrastive"][i % 2], 0.1, True, 0, [8, 32][(i // 2) % 2])
    score = SCORES[(i // 4) % len(SCORES)]
    density = list(DENSITIES)[(i // 20) % 3] if score in ("density", "diff") else ""
    eps = EPS[(i // 60) % len(EPS)]
    h = hashlib.sha1(str(i).encode()).digest()
    base = 0.5 + 0.45 * h[0] / 255
    where = provenance("cpu", data_checksums={"digits/val": "ab12", "digits/test": "cd34"})
    cols = dict(experiment="demo-search", trial_id=f"t{i:05d}", stage="search", protocol="val-ood:digits-blend",
                network=net, started_at=datetime(2026, 11, 27, tzinfo=UTC), score=score, density=density,
                density_params=DENSITIES.get(density, "{}"), eps=eps, search_seed=0, ensemble=False,
                search_params=json.dumps({"point": f"g{i % 4}|{score}|{density}|{eps}"}), objective=base,
                duration_s=1.0 + h[1] / 100)
    rows = []
    for seed in (0, 1):
        for j, (ood, split) in enumerate([("digits-blend", "val"), *((t, "test") for t in TEST_SETS)]):
            v = min(1.0, base + (h[2 + j] - 128) / 5000 + seed / 1000)
            rows.append(result_row(**cols, provenance=where, seed=seed, checkpoints=[f"/run/models/demo/k{i % 4}-s{seed}"],
                                   ood_dataset=ood, split=split, auroc=v, auprc=v - 0.01, fpr95=1 - v, n_id=300,
                                   n_ood=300, id_accuracy=0.97,
                                   density_fit=json.dumps({"max_jitter_": 1e-6}) if density else None))
    return rows


def train_rows(i: int) -> list[dict]:
    """One training epoch's row (network i // 15, epoch i % 15 + 1)."""
    from densitune.results.rows import provenance, result_row

    n = i // 15
    net = Net("cnn", "digits", ["ce", "contrastive"][n % 2], 0.1, True, 0, [8, 32][(n // 2) % 2])
    return [result_row(experiment="demo", trial_id=f"net{n}", stage="train", protocol="train", network=net,
                       started_at=datetime(2026, 11, 27, tzinfo=UTC), provenance=provenance("cpu"), seed=n // 4,
                       epoch=i % 15 + 1, train_loss=1.0 / (1 + i % 15), id_accuracy=0.9, duration_s=2.0)]


def _write(args: tuple[str, int, int]) -> int:
    from densitune.results.store import write_rows

    results, start, stop = args
    for i in range(start, stop):
        write_rows(results, trial_rows(i), name=f"p-{i:05d}")
    return stop - start


def generate(run: Path, trials: int) -> None:
    from densitune.results.store import write_rows

    results = run / "results"
    results.mkdir(parents=True)
    for i in range(120):
        write_rows(results, train_rows(i), name=f"net{i // 15}-e{i % 15 + 1:04d}")
    chunks = [(str(results), s, min(trials, s + 250)) for s in range(0, trials, 250)]
    with mp.get_context("fork").Pool(os.cpu_count() or 2) as pool:
        assert sum(pool.map(_write, chunks)) == trials


def roll(run: Path, trials: int) -> None:
    """What the search's driver does as trials finish (``densitune.search.tune.compaction_callback``): hand each
    finished trial's file to a :class:`RollingCompaction`, which merges every ``COMPACT_EVERY`` of them."""
    rolling = RollingCompaction(run / "results", "demo-search")
    for i in range(trials):
        rolling.finished(f"p-{i:05d}")


def densitune_cli() -> list[str]:
    """The ``densitune`` command of this Python's environment (its console script, else ``python -m densitune``)."""
    exe = Path(sys.executable).parent / "densitune"
    return [str(exe)] if exe.is_file() else [shutil.which("densitune") or sys.executable, *([] if shutil.which(
        "densitune") else ["-m", "densitune"])]


def measure(argv: list[str], repeat: int) -> tuple[float, float, float, str]:
    """(median wall s, median CPU s (user + system), max peak RSS MB, stdout) of ``densitune ARGV`` run
    ``repeat`` times as a process. CPU seconds over the 2 cores bound what an idle machine's wall time can be."""
    runs = [run_process([*densitune_cli(), *argv]) for _ in range(repeat)]
    for p in runs:
        if p.returncode != 0:
            sys.exit(f"densitune {' '.join(argv)} failed:\n{p.stderr}")
    return (statistics.median(p.wall for p in runs), statistics.median(p.cpu for p in runs), max(p.peak_mb for p in runs),
            runs[-1].stdout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000)
    ap.add_argument("--out", default="/tmp/dt-scale")
    ap.add_argument("--repeat", type=int, default=3, help="runs per command (median wall time is reported)")
    ap.add_argument("--keep", action="store_true", help="keep the run folder")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 300 trials, one run per command")
    args = ap.parse_args()
    if args.quick:
        args.trials, args.repeat = 300, 1
    bench = Bench("results_scale", quick=args.quick)
    print(f"# results_scale: {describe(bench.machine)}")
    run = Path(args.out)
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.perf_counter()
    generate(run, args.trials)
    n_files = sum(1 for _ in (run / "results").rglob("*.parquet"))
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; wrote {args.trials} trials ({args.trials * 14} rows) + 120 epochs "
          f"= {n_files} files in {time.perf_counter() - t0:.0f} s (not timed below)")
    commands = {"report": ["report", str(run)], "best": ["best", str(run)],
                "query": ["query", str(run), "SELECT count(*) FROM results"]}
    layouts: dict[str, tuple[int, dict]] = {}
    layouts["one file per trial (reference)"] = (n_files, {k: measure(v, args.repeat) for k, v in commands.items()})
    t0 = time.perf_counter()
    roll(run, args.trials)
    print(f"rolling compaction as a search does it (every {COMPACT_EVERY} finished trials): "
          f"{time.perf_counter() - t0:.1f} s in all")
    n_search = sum(1 for _ in (run / "results").rglob("*.parquet"))
    layouts["as a search leaves it"] = (n_search, {k: measure(v, args.repeat) for k, v in commands.items()})
    t0 = time.perf_counter()
    subprocess.run([*densitune_cli(), "compact", str(run)], check=True, capture_output=True)
    print(f"compact: {time.perf_counter() - t0:.1f} s")
    n_compacted = sum(1 for _ in (run / "results").rglob("*.parquet"))
    layouts["after densitune compact"] = (n_compacted, {k: measure(v, args.repeat) for k, v in commands.items()})
    outputs = {tuple(res[k][3] for k in commands) for _, res in layouts.values()}
    assert len(outputs) == 1, "the layout changed a table or the row count"
    print(f"\n| layout | command | files | wall s (median of {args.repeat}) | CPU s | peak MB | <= {GATE_S:g} s, <= {GATE_MB:g} MB |")
    print("|---|---|---|---|---|---|---|")
    for layout, (files, res) in layouts.items():
        for k, (wall, cpu, mb, _) in res.items():
            met = wall <= GATE_S and mb <= GATE_MB
            print(f"| {layout} | {k} | {files} | {wall:.2f} | {cpu:.2f} | {mb:.0f} | {'yes' if met else 'NO'} |")
    loose = layouts["one file per trial (reference)"][1]
    gated = layouts["as a search leaves it"][1]
    after = layouts["after densitune compact"][1]
    ok = all(wall <= GATE_S and mb <= GATE_MB for wall, _, mb, _ in gated.values())
    faster = all(after[k][0] < loose[k][0] for k in commands)
    print(f"\nafter compact faster than one file per trial, every command: {'yes' if faster else 'NO'} ("
          + ", ".join(f"{k} {loose[k][0] / after[k][0]:.1f}x" for k in commands) + "); than as a search leaves it: "
          + ", ".join(f"{k} {gated[k][0] / after[k][0]:.2f}x" for k in commands))
    print("query output:", " ".join(outputs.pop()[2].split()))
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"GATE (as a search leaves it: <= {GATE_S:g} s and <= {GATE_MB:g} MB each; compact faster than one file per trial): "
          f"{'MET' if ok and faster else 'NOT MET'}")
    for k in commands:
        bench.record(f"results_scale.{k}_s", gated[k][0])
    bench.record("results_scale.peak_mb", max(mb for _, _, mb, _ in gated.values()))
    bench.record("results_scale.compact_speedup", min(loose[k][0] / after[k][0] for k in commands))
    print(bench.summary())
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)
    return 0 if (ok and faster) or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
