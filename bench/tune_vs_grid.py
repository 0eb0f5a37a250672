"""Does ``densitune tune`` find as good a network as an exhaustive grid, for a fraction of the grid's training epochs?

The workload (issue 25) on the embedded digits: D ∈ {2, 4, 8, 16, 32, 64} × (ce, or contrastive with
λ ∈ {0.03, 0.1, 0.3}): 24 networks, every one trained for all ``--epochs`` on each of ``--grid-seeds`` seeds
(``densitune.run_training``), then one grid search of every network group at the rung's point (score density,
gmm_sum, ε = 0; ``densitune.run_search``). ``densitune.tune`` searches the same space (-D over the same six values,
the two losses, λ log-uniform on [0.03, 0.3]) with TPE + ASHA (rungs 1, 3, 9 for 9 epochs), ``--num-networks``
outer trials, ``final_seeds`` = the grid's seeds and the same full search (score density, gmm_sum, ε = 0) of its
winner, for ``--tune-seeds`` sampler seeds, each into a run of its own (no network reused across them).

Both objectives are the search's validation objective (mean over the validation OOD sets, then over the same
seeds 0 .. grid-seeds - 1) of the chosen network group; nothing reads the test split to choose. The gap is
(the grid's best objective - the objective of tune's choice), its median over the tune seeds is gated at 0.005;
the grid's seed-to-seed std of the objective (at its best config) is shown beside it, and the test AUROC (mean
over the test OOD sets and seeds) of both choices. Epochs are counted from the rows: the train rows (one per
network and epoch) of each run, so every epoch tune trains counts (rungs, promotions and the final seeds).
The gated cost is tune's epochs / the 24-network grid's epochs on ONE seed (24 × epochs); the ratio to the grid
as run here (all its seeds) is shown too.

    python bench/tune_vs_grid.py [--epochs 9] [--grid-seeds 2] [--tune-seeds 3] [--num-networks 16] [--quick]

Writes ``tune_vs_grid.json`` beside the records, prints a markdown summary and records ``tune_vs_grid.*``.
``--quick``: 3 epochs, D ∈ {4, 16}, one tune seed of 4 networks (a smoke run; nothing written but quick.jsonl).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from _harness import Bench, describe

import densitune
from densitune.app.train import TrainGrid
from densitune.results.store import read_results
from densitune.trainables.train.config import TrainConfig

DIMS = (2, 4, 8, 16, 32, 64)
LAMS = (0.03, 0.1, 0.3)
#: the rung's inner point, and the final search of both sides: score density, gmm_sum, ε = 0
POINT = {"densities": ("gmm_sum",), "scores": ("density",), "eps_grid": (0.0,)}


def grid_networks(dims: tuple[int, ...], epochs: int, seeds: int) -> list[TrainConfig]:
    """The grid: every D × (ce, contrastive at each λ) × seed, trained in full."""
    variants = [("ce", 0.1)] + [("contrastive", lam) for lam in LAMS]  # ce carries no λ (its config ignores lam)
    return [TrainConfig(backbone="cnn", feature_dim=d, loss=loss, lam=lam, seed=s, epochs=epochs, dataset="digits",
                        experiment="grid")
            for d in dims for loss, lam in variants for s in range(seeds)]


def train_epochs(results_dir: str) -> int:
    """How many (network, epoch) train rows the run holds: the epochs it trained (each recorded once)."""
    rows = read_results(results_dir, stage="train").to_pylist()
    keys = [(r["trial_id"], r["epoch"]) for r in rows]
    assert len(keys) == len(set(keys)), "an epoch recorded twice"
    return len(keys)


def groups(results_dir: str, experiment: str) -> dict[str, dict[str, Any]]:
    """network group (D, loss, λ) -> its search objective, per-seed validation objectives and test AUROC."""
    out: dict[str, dict[str, Any]] = {}
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"val": defaultdict(list), "test": []})
    for r in read_results(results_dir, experiment=experiment).to_pylist():
        if r["stage"] != "search" or r["seed"] is None:
            continue
        name = f"D={r['D']} {r['loss']}" + (f" λ={r['center_loss']:.3g}" if r["center_loss"] is not None else "")
        out[name] = {"D": r["D"], "loss": r["loss"], "lam": r["center_loss"], "objective": r["objective"]}
        if r["split"] == "val":
            per[name]["val"][r["seed"]].append(r["auroc"])
        else:
            per[name]["test"].append(r["auroc"])
    for name, g in out.items():
        seeds = {s: statistics.fmean(v) for s, v in sorted(per[name]["val"].items())}  # val_agg mean over OOD sets
        g["seed_objectives"] = seeds
        g["seed_std"] = statistics.stdev(seeds.values()) if len(seeds) > 1 else float("nan")
        g["test_auroc"] = statistics.fmean(per[name]["test"])
        assert abs(statistics.fmean(seeds.values()) - g["objective"]) < 1e-9, (name, seeds, g["objective"])
    return out


def tune_trials(results_dir: str, experiment: str) -> list[dict[str, Any]]:
    """Each outer trial of a tune: its network, how it ended, the epochs it reached and its objective at each rung."""
    rows = read_results(results_dir, experiment=experiment, stage="tune").to_pylist()
    rungs: dict[str, dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["tune_status"] == "rung":
            rungs[r["trial_id"]][r["epoch"]] = r["objective"]
    return [{"network": json.loads(r["search_params"])["network"], "status": r["tune_status"], "epochs": r["epoch"],
             "rungs": rungs.get(r["trial_id"], {})} for r in rows if r["tune_status"] != "rung"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=9, help="full epochs of a network (ASHA rungs 1, 3, 9, ...)")
    ap.add_argument("--grid-seeds", type=int, default=2, help="training seeds of the grid and tune's final seeds")
    ap.add_argument("--tune-seeds", type=int, default=3, help="TPE sampler seeds (one tune each)")
    ap.add_argument("--num-networks", type=int, default=16, help="outer trials of each tune")
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 3 epochs, D 4 and 16, one tune of 4 networks")
    args = ap.parse_args()
    dims = DIMS
    if args.quick:
        args.epochs, args.tune_seeds, args.num_networks, dims = 3, 1, 4, (4, 16)
    bench = Bench("tune_vs_grid", quick=args.quick)
    print(f"# tune_vs_grid: {describe(bench.machine)}")
    work = Path(tempfile.mkdtemp(prefix="densitune-bench-tune-"))
    common = {"num_cpus": args.cpus, "quiet": True}
    try:
        t0 = time.perf_counter()
        grid_run = str(work / "grid")
        densitune.run_training(grid_run, networks=grid_networks(dims, args.epochs, args.grid_seeds), **common)
        densitune.run_search(grid_run, experiment="grid-search", **POINT, **common)
        grid_s = time.perf_counter() - t0
        grid_epochs = train_epochs(str(work / "grid" / "results"))
        grid = groups(str(work / "grid" / "results"), "grid-search")
        best_name = max(grid, key=lambda n: grid[n]["objective"])
        best = grid[best_name]
        one_seed_epochs = grid_epochs // args.grid_seeds
        print(f"grid: {len(grid)} network configs × {args.grid_seeds} seeds, {grid_epochs} epochs, {grid_s:.0f} s; "
              f"best {best_name}: objective {best['objective']:.4f} (seed std {best['seed_std']:.4f}), "
              f"test AUROC {best['test_auroc']:.4f}")
        tunes = []
        for seed in range(args.tune_seeds):
            t0 = time.perf_counter()
            run = str(work / f"tune-{seed}")
            outcome = densitune.tune(
                run, networks=TrainGrid(experiment="tune", dims=dims, losses=("ce", "contrastive"), epochs=args.epochs),
                lam_range=(min(LAMS), max(LAMS)), num_networks=args.num_networks, seed=seed, keep=1,
                final_seeds=args.grid_seeds, search_values=POINT, **common)
            chosen = groups(str(work / f"tune-{seed}" / "results"), f"{outcome.experiment}-final")
            assert len(chosen) == 1, chosen
            (name, g), = chosen.items()
            epochs = train_epochs(str(work / f"tune-{seed}" / "results"))
            tunes.append({"seed": seed, "choice": name, **g, "seed_objectives": list(g["seed_objectives"].values()),
                          "trials": tune_trials(str(work / f"tune-{seed}" / "results"), outcome.experiment),
                          "networks": len(outcome.trials),
                          "stopped": sum(r["tune_status"] == "stopped" for r in outcome.trials),
                          "epochs": epochs, "gap": best["objective"] - g["objective"],
                          "seconds": time.perf_counter() - t0})
            t = tunes[-1]
            print(f"tune seed {seed}: {t['networks']} networks ({t['stopped']} stopped), {epochs} epochs, "
                  f"{t['seconds']:.0f} s; chose {name}: objective {g['objective']:.4f}, gap {t['gap']:+.4f}")
            for trial in t["trials"]:
                rungs = " ".join(f"e{e}={v:.4f}" for e, v in sorted(trial["rungs"].items()))
                print(f"    {trial['status']:8s} {trial['network']}  {rungs}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    median_gap = statistics.median(t["gap"] for t in tunes)
    median_epochs = statistics.median(t["epochs"] for t in tunes)
    median_test = statistics.median(t["test_auroc"] for t in tunes)
    result = {"setup": f"digits, cnn, D {list(dims)} × (ce, contrastive λ {list(LAMS)}), {args.epochs} epochs; "
                       f"objective: score density, gmm_sum, ε = 0, validation AUROC mean over the default validation "
                       f"OOD sets and seeds 0..{args.grid_seeds - 1}",
              "grid": {"configs": len(grid), "seeds": args.grid_seeds, "epochs": grid_epochs, "one_seed_epochs":
                       one_seed_epochs, "seconds": grid_s, "best": best_name,
                       **{k: v for k, v in best.items() if k != "seed_objectives"},
                       "seed_objectives": list(best["seed_objectives"].values()),
                       "configs_ranked": sorted(((n, g["objective"], g["seed_std"], g["test_auroc"])
                                                 for n, g in grid.items()), key=lambda x: -x[1])},
              "num_networks": args.num_networks, "tune": tunes, "median_gap": median_gap,
              "median_epochs": median_epochs}
    if not args.quick:
        (bench.path.parent / "tune_vs_grid.json").write_text(json.dumps(result, indent=1))
    print(f"\n| side | choice | validation objective | gap to grid | grid seed std | test AUROC | epochs |\n"
          f"|---|---|---|---|---|---|---|\n| grid | {best_name} | {best['objective']:.4f} | - | {best['seed_std']:.4f} | "
          f"{best['test_auroc']:.4f} | {grid_epochs} ({one_seed_epochs} a seed) |")
    for t in tunes:
        print(f"| tune seed {t['seed']} | {t['choice']} | {t['objective']:.4f} | {t['gap']:+.4f} | {best['seed_std']:.4f} | "
              f"{t['test_auroc']:.4f} | {t['epochs']} |")
    bench.record("tune_vs_grid.median_gap", median_gap)
    bench.record("tune_vs_grid.epoch_fraction", median_epochs / one_seed_epochs)
    bench.record("tune_vs_grid.epoch_fraction_all_seeds", median_epochs / grid_epochs)
    bench.record("tune_vs_grid.grid_seed_std", best["seed_std"])
    bench.record("tune_vs_grid.grid_test_auroc", best["test_auroc"])
    bench.record("tune_vs_grid.tune_test_auroc", median_test)
    print(bench.summary())


if __name__ == "__main__":
    main()
