"""Per-trial overhead of the search: no-op trials through the same Tune code path (issue 13, item 5).

Runs :func:`densitune.search.tune.run_search` (OptunaSearch + GridSampler, ``reuse_actors``, the progress and
Optuna-mirror callbacks, the fatal-error stopper, Tune's experiment state) with the trial body replaced by a
no-op that only reports its objective, for two grid sizes. The per-trial overhead is the slope
(T(large) - T(small)) / (n_large - n_small), which leaves out the fixed cost of starting a Tuner.
Target on 2 cores: <= 0.2 s per trial (figure ``ray_overhead.per_trial_s`` in ``bench/_harness.py``).

The search is called here as ``densitune.search.tune.run_search`` itself, not through ``_fixtures.run_search_config``:
the question is that code path's own cost, with its trainable swapped for a no-op and models that do not exist.

    python bench/ray_overhead.py [--small 20] [--large 120] [--cpus 2] [--quick]

``--quick``: 4 vs 8 trials on one CPU, a smoke run of the script (its slope is no measure).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _fixtures import started_ray
from _harness import FIGURES, Bench, describe

TARGET_S = FIGURES["ray_overhead.per_trial_s"].gate.threshold  # type: ignore[union-attr]


def noop_trainable(config: dict[str, Any], spec: Any, groups: Any, points: Any, run: Any) -> None:
    """The search trainable's signature and report, without the trial's work."""
    from ray import tune

    tune.report({spec.objective: 0.5, "eps": points[config["point"]].eps})


def timed_search(n: int, root: Path) -> float:
    from densitune.search import tune as search_tune
    from densitune.search.models import ModelGroup
    from densitune.search.spec import SearchSpec

    groups = [ModelGroup(key=f"cnn-D{d}-ce", backbone="cnn", D=d, loss="ce", lam=0.0, spectral=True, dataset="digits",
                         data_seed=0, seeds=(0,), checkpoints=(f"/nonexistent/cnn-D{d}-ce-s0",)) for d in (8, 16, 32, 64)]
    spec = SearchSpec(experiment=f"overhead-{n}", val_ood="digits-blend", test_ood=("digits-rot90",),
                      eps_grid=tuple(i / 1000 for i in range(n // len(groups))))
    run = search_tune.SearchRun(results_dir=str(root / f"r{n}" / "results"), storage_path=str(root / f"r{n}" / "tune"),
                                cpus_per_trial=1.0, gpus_per_trial=0.0)
    t0 = time.perf_counter()
    grid = search_tune.run_search(spec, groups, run, progress=False)
    wall = time.perf_counter() - t0
    assert grid is not None and len(grid) == n and all(r.error is None for r in grid), "not every no-op trial finished"
    return wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=20)
    ap.add_argument("--large", type=int, default=120)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: 4 vs 8 trials on one CPU")
    args = ap.parse_args()
    if args.quick:
        args.small, args.large, args.cpus = 4, 8, 1
    if args.large <= args.small:
        sys.exit("ray_overhead: error: --large must be more than --small")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from densitune.search import tune as search_tune

    search_tune.search_trainable = noop_trainable  # type: ignore[assignment]  # the one swapped part
    bench = Bench("ray_overhead", quick=args.quick)
    print(f"# ray_overhead: {describe(bench.machine)}")
    with started_ray(args.cpus) as ray_session, tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        print(f"ray.init {ray_session.start_s:.1f} s")
        timed_search(4, Path(tmp))  # warm-up: workers and imports
        small = timed_search(args.small, Path(tmp))
        large = timed_search(args.large, Path(tmp))
    per_trial = (large - small) / (args.large - args.small)
    print(f"{args.small} no-op trials: {small:.1f} s; {args.large}: {large:.1f} s "
          f"({args.large / large:.1f} trials/s including the Tuner's start)")
    met = per_trial <= TARGET_S
    print(f"per-trial overhead (slope): {per_trial:.3f} s (target <= {TARGET_S} s) -> {'met' if met else 'NOT met'}")
    bench.record("ray_overhead.per_trial_s", per_trial)
    print(bench.summary())
    return 0 if met or args.quick else 1


if __name__ == "__main__":
    sys.exit(main())
