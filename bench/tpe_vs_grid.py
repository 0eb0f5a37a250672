"""Does TPE with a third of the grid's budget find as good an ε as the grid?

On the embedded default (digits, cnn D=32 contrastive, gmm_sum density), one ε grid
search of N points ({0} plus log-spaced values) is compared with TPE searches of N // 3
trials over {0} ∪ log-uniform[lo, hi], for three sampler seeds. Only validation AUROC is
used (that is what the search selects on). Pass: the median over seeds of
(grid best − TPE best) is at most 0.005.

    python bench/tpe_vs_grid.py [--out bench/results] [--points 30] [--cpus 2] [--quick]

Writes ``tpe_vs_grid.json``, prints a markdown summary and records ``tpe.median_gap``. About 3 minutes on 2 cores.
``--quick``: 2 epochs, 5 grid points, one TPE seed; no JSON written.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _fixtures import run_search_config, search_run, started_ray, train_network
from _harness import FIGURES, Bench, describe

from densitune.results.store import read_results

LO, HI = 1e-4, 0.1


def best_val(results_dir: str, experiment: str) -> tuple[float, float]:
    rows = [r for r in read_results(results_dir, experiment=experiment).to_pylist() if r["split"] == "val"]
    top = max(rows, key=lambda r: (r["auroc"], -r["eps"]))
    return float(top["auroc"]), float(top["eps"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    ap.add_argument("--points", type=int, default=30, help="grid points besides eps = 0")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 2 epochs, 5 grid points, one TPE seed")
    args = ap.parse_args()
    epochs, seeds = (2, (0,)) if args.quick else (15, (0, 1, 2))
    if args.quick:
        args.points = 5
    work = Path(tempfile.mkdtemp(prefix="densitune-bench-"))
    bench = Bench("tpe_vs_grid", quick=args.quick)
    print(f"# tpe_vs_grid: {describe(bench.machine)}")
    train_network(work / "models", backbone="cnn", feature_dim=32, loss="contrastive", epochs=epochs, experiment="bench")
    run = search_run(work)
    base = dict(models=str(work / "models"), val_ood="digits-blend", test_ood=["digits-rot90"], densities=["gmm_sum"],
                eps_range=[LO, HI])

    grid_eps = (0.0, *[float(e) for e in np.geomspace(LO, HI, args.points)])
    budget = len(grid_eps) // 3
    tpe = []
    with started_ray(args.cpus):
        t0 = time.perf_counter()
        run_search_config(dict(experiment="grid", eps_grid=list(grid_eps), sampler="grid", **base), run)
        grid_s = time.perf_counter() - t0
        grid_best, grid_eps_best = best_val(run.results_dir, "grid")
        for seed in seeds:
            t0 = time.perf_counter()
            name = f"tpe-{seed}"
            run_search_config(dict(experiment=name, sampler="tpe", num_samples=budget, seed=seed, **base), run)
            best, eps = best_val(run.results_dir, name)
            tpe.append({"seed": seed, "best_val_auroc": best, "eps": eps, "gap": grid_best - best,
                        "seconds": time.perf_counter() - t0})
    median_gap = statistics.median(t["gap"] for t in tpe)
    gate = FIGURES["tpe.median_gap"].gate
    assert gate is not None
    result = {
        "setup": f"digits, cnn D=32 contrastive ({epochs} epochs), gmm_sum, score density, validation OOD digits-blend",
        "grid": {"trials": len(grid_eps), "best_val_auroc": grid_best, "eps": grid_eps_best, "seconds": grid_s},
        "tpe_trials": budget,
        "tpe": tpe,
        "median_gap": median_gap,
        "pass": gate.passes(median_gap),
    }
    if not args.quick:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "tpe_vs_grid.json").write_text(json.dumps(result, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    print(f"grid: {len(grid_eps)} trials, best validation AUROC {grid_best:.4f} at eps={grid_eps_best:.4g} ({grid_s:.0f} s)")
    print("| TPE seed | trials | best validation AUROC | eps | gap to grid |\n|---|---|---|---|---|")
    for t in tpe:
        print(f"| {t['seed']} | {budget} | {t['best_val_auroc']:.4f} | {t['eps']:.4g} | {t['gap']:+.4f} |")
    print(f"median gap {median_gap:+.4f} -> {'PASS' if result['pass'] else 'FAIL'} (threshold {gate.threshold})")
    bench.record("tpe.median_gap", median_gap)
    print(bench.summary())


if __name__ == "__main__":
    main()
