"""The demo service: train -> search on the embedded digits default (``densitune demo``), timed per stage.

The demo runs the train and search services with the settings of the commands below (a test checks
that the command line gives the same options), so that what the demo does is what a user can type.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from densitune.app.search import SearchOptions, SearchOutcome, search
from densitune.app.session import LIBRARY_HINT, Outcome, say
from densitune.app.train import TrainGrid, TrainOptions, TrainOutcome, train
from densitune.run.resource_flags import check_positive

#: The demo as commands (``densitune train|search --out DEMO ...``): shown with ``--verbose``.
DEMO_TRAIN = ("--experiment", "demo", "--dataset", "digits", "--backbone", "cnn", "-D", "8", "32",
              "--loss", "ce", "contrastive", "--seeds", "0", "1", "--epochs", "15")
DEMO_SEARCH = ("--experiment", "demo-search", "--sampler", "grid", "--resume",
               "--score", "density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy",
               "energy", "rmd", "knn", "vim",  # the field's simple baselines, in the method table beside DDU
               "--density", "gmm_sum", "gmm_max", "kde", "--eps-grid", "0", "0.005", "0.01", "0.05",
               "--val-ood", "digits-blend", "noise-blobs", "--val-agg", "min",  # one near, one far; the worst decides
               "--keep-scores", "all",  # per-sample test scores: `densitune compare` works on the demo
               "--attacks", "fgsm", "bim", "pgd", "--attack-eps", "0.1")

#: The networks of :data:`DEMO_TRAIN`.
DEMO_GRID = TrainGrid(experiment="demo", dataset="digits", backbones=("cnn",), dims=(8, 32), losses=("ce", "contrastive"),
                      seeds=(0, 1), epochs=15)


def demo_search_values() -> dict[str, Any]:
    """The search spec values of :data:`DEMO_SEARCH` (a fresh dict: the caller may change it)."""
    return {"experiment": "demo-search", "val_ood": ["digits-blend", "noise-blobs"], "val_agg": "min",
            "densities": ["gmm_sum", "gmm_max", "kde"],
            "scores": ["density", "diff", "msp", "entropy", "gradnorm", "ensemble_msp", "ensemble_entropy", "energy", "rmd",
                       "knn", "vim"],
            "eps_grid": [0.0, 0.005, 0.01, 0.05], "sampler": "grid", "keep_scores": "all", "attacks": ["fgsm", "bim", "pgd"],
            "attack_eps": 0.1}


@dataclass(frozen=True, kw_only=True)
class DemoOptions:
    out: str = "densitune-demo"
    num_cpus: int | None = None
    resume: bool = False  # continue an interrupted demo (unfinished networks from their last epoch)
    quiet: bool = False
    verbose: bool = False
    resume_hint: str = LIBRARY_HINT


@dataclass(frozen=True)
class DemoOutcome(Outcome):
    train: TrainOutcome | None = None
    search: SearchOutcome | None = None  # None when training stopped
    train_seconds: float = 0.0
    search_seconds: float = 0.0  # the search without reading its results for the tables
    report_seconds: float = 0.0  # the search's reading of the results and its tables
    total_seconds: float = 0.0


def run_demo(options: DemoOptions) -> DemoOutcome:
    """Train the demo's 8 networks, then search them (228 trials); each stage's wall seconds in the outcome."""

    check_positive("--num-cpus", options.num_cpus, whole=True)
    t0 = time.perf_counter()
    run: dict[str, Any] = {"out": options.out, "num_cpus": options.num_cpus, "quiet": options.quiet, "verbose": options.verbose,
           "resume_hint": options.resume_hint}
    if options.verbose:
        print(f"\n=== densitune train --out {options.out} {' '.join(DEMO_TRAIN)}", flush=True)
    trained = train(TrainOptions(**run, networks=DEMO_GRID, resume=options.resume))
    train_s = time.perf_counter() - t0
    if trained.error is not None:
        return DemoOutcome(trained.error, trained, train_seconds=train_s, total_seconds=train_s)
    say(options, trained.summary)
    if options.verbose:
        print(f"\n=== densitune search --out {options.out} {' '.join(DEMO_SEARCH)}", flush=True)
    t1 = time.perf_counter()
    searched = search(SearchOptions(**run, values=demo_search_values(), resume=True))
    search_s = time.perf_counter() - t1
    return DemoOutcome(searched.error, trained, searched, train_seconds=train_s, search_seconds=search_s - searched.report_seconds,
                       report_seconds=searched.report_seconds, total_seconds=time.perf_counter() - t0)
