"""Selection on several validation OOD sets (--val-ood A B --val-agg min) and `densitune compare`, on real searches.

The case: one small CNN (D = 8) on the embedded digits, ViM with principal subspace dim 2 or 6. Selecting on the
near-OOD rotated digits alone picks dim 2, which ranks the far-OOD smooth noise blobs above the digits (test AUROC
< 0.5); with the blobs as a second validation set and the worst set deciding, dim 6 wins, and it is above chance on
every test set. The per-sample scores those searches keep feed `densitune compare` (DeLong for one seed, a paired
bootstrap for two).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import train_to

from densitune.results.sample_scores import read_sample_scores, scores_dir
from densitune.results.store import read_results
from densitune.search.ood.compare import delong
from densitune.search.ood.metrics import auroc
from densitune.search.spec import SearchSpec

#: the tests on ``runs`` are slow: three real searches (Ray, Tune, Optuna) in subprocesses, about 2 minutes on 2 cores
slow = pytest.mark.slow

SPEC = "scores: [vim]\ndensity_params: {vim: {dim: [2, 6]}}\neps_grid: [0]\n"


def _cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}
    p = subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, timeout=600, env=env)
    if ok:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """one: a seed-0 network; two: the same network and its seed-1 sibling (one model group of two seeds)."""
    root = tmp_path_factory.mktemp("m")
    train_to(root / "one", "t", seed=0)
    shutil.copytree(root / "one", root / "two")
    train_to(root / "two", "t", seed=1)
    return {"one": root / "one", "two": root / "two"}


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    spec = root / "vim.yaml"
    spec.write_text(SPEC)
    one = ["--models", str(models["one"]), "--spec", str(spec), "--num-cpus", "2", "-q"]
    _cli("search", "--out", str(root / "near"), *one, "--val-ood", "digits-rot90",
         "--test-ood", "noise-blobs", "digits-blend", "photo-patches")
    _cli("search", "--out", str(root / "worst"), *one, "--val-ood", "digits-rot90", "noise-blobs", "--val-agg", "min",
         "--test-ood", "digits-blend", "photo-patches", "noise-uniform", "digits-hflip", "--keep-scores", "all")
    _cli("search", "--out", str(root / "seeds"), "--models", str(models["two"]), "--score", "density", "rmd",
         "--eps-grid", "0", "--test-ood", "noise-uniform", "digits-rot90", "--keep-scores", "all", "--num-cpus", "2", "-q")
    return {"near": root / "near", "worst": root / "worst", "seeds": root / "seeds"}


def _rows(run: Path) -> list[dict]:
    return read_results(run / "results").to_pylist()


def _best(run: Path) -> dict:
    return json.loads(_cli("best", str(run), "--json").stdout)


@slow
@pytest.mark.process
def test_selecting_on_the_worst_of_a_near_and_a_far_set_avoids_a_failing_config(runs) -> None:
    near, worst = _best(runs["near"]), _best(runs["worst"])
    assert near["density_params"] == {"dim": 2}  # `best --json`: parameters as a nested object
    assert worst["density_params"] == {"dim": 6}
    # what selection on one validation set picked fails on a second kind of OOD (far: the noise blobs)
    picked = [r for r in _rows(runs["near"]) if r["trial_id"] == near["trial_id"] and r["split"] == "test"]
    assert {r["ood_dataset"]: r["auroc"] for r in picked}["noise-blobs"] < 0.5
    # the worst-set selection is above chance on every test set
    rows = _rows(runs["worst"])
    chosen = [r for r in rows if r["trial_id"] == worst["trial_id"]]
    assert all(r["auroc"] > 0.5 for r in chosen if r["split"] == "test") and len(chosen) == 2 + 4
    assert {r["protocol"] for r in rows} == {"val-ood:digits-rot90+noise-blobs:min"}
    # each trial's objective is its worst validation set; dim 2 wins on the near set alone and fails the far one
    by_trial: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["split"] == "val":
            by_trial.setdefault(r["trial_id"], {})[r["ood_dataset"]] = r["auroc"]
    objective = {r["trial_id"]: r["objective"] for r in rows}
    for tid, vals in by_trial.items():
        assert set(vals) == {"digits-rot90", "noise-blobs"} and objective[tid] == min(vals.values())
    dim2 = by_trial[next(r["trial_id"] for r in rows if json.loads(r["density_params"]) == {"dim": 2})]
    assert dim2["digits-rot90"] > by_trial[worst["trial_id"]]["digits-rot90"] and dim2["noise-blobs"] < 0.5


def test_mean_and_worst_aggregation_follow_the_metric_direction() -> None:
    from densitune.search.evaluate import aggregate_objective

    kw = dict(experiment="x", val_ood=("digits-rot90", "noise-blobs"), test_ood=("noise-uniform",))
    per_set = [[0.9, 0.7], [0.4, 0.6]]  # sets x seeds: set means 0.8 and 0.5
    assert aggregate_objective(SearchSpec(**kw), per_set) == pytest.approx(0.65)
    assert aggregate_objective(SearchSpec(**kw, val_agg="min"), per_set) == pytest.approx(0.5)
    assert aggregate_objective(SearchSpec(**kw, val_agg="min", metric="fpr95"), per_set) == pytest.approx(0.8)  # worst
    assert SearchSpec(**kw).protocol_label == "val-ood:digits-rot90+noise-blobs:mean"
    assert SearchSpec(**{**kw, "val_ood": "digits-rot90"}).protocol_label == "val-ood:digits-rot90"  # one set: as before


@slow
@pytest.mark.process
def test_kept_scores_reproduce_the_rows(runs) -> None:
    rows = [r for r in _rows(runs["seeds"]) if r["split"] == "test"]
    kept = read_sample_scores(runs["seeds"] / "results", "search", {r["trial_id"] for r in rows}).to_pandas()
    assert len(list((scores_dir(runs["seeds"] / "results") / "experiment=search").glob("*.parquet"))) == 2  # one per trial
    for r in rows:
        k = kept[(kept["trial_id"] == r["trial_id"]) & (kept["seed"] == r["seed"]) & (kept["ood_dataset"] == r["ood_dataset"])]
        s_id, s_ood = (k[k["side"] == side].sort_values("index")["score"].to_numpy() for side in ("id", "ood"))
        assert (len(s_id), len(s_ood)) == (r["n_id"], r["n_ood"])
        assert auroc(s_id, s_ood) == pytest.approx(r["auroc"], abs=1e-12)


def _table(stdout: str) -> dict[str, list[str]]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("| ") and not ln.startswith("| ood_dataset")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in ln.strip("|").split("|")] for ln in lines)}


@slow
@pytest.mark.process
def test_compare_two_seeds_paired_bootstrap(runs) -> None:
    p = _cli("compare", str(runs["seeds"]), "--a", "score = 'rmd'", "--b", "score = 'density'", "--format", "json")
    records = json.loads(p.stdout)  # tidy JSON: one record per OOD set
    rows = [r for r in _rows(runs["seeds"]) if r["split"] == "test"]
    for r in records:
        per_seed = [np.mean([x["auroc"] for x in rows if x["score"] == s and x["ood_dataset"] == r["ood_dataset"]])
                    for s in ("rmd", "density")]
        assert r["diff"] == pytest.approx(per_seed[0] - per_seed[1], abs=1e-9)  # mean over the two seeds (JSON: 10 digits)
        assert r["method"] == "bootstrap" and r["seeds"] == 2 and r["ci_low"] <= r["diff"] <= r["ci_high"]
        assert r["contains_0"] == ("yes (not established)" if r["ci_low"] <= 0 <= r["ci_high"] else "no")
    assert {r["ood_dataset"] for r in records} == {"noise-uniform", "digits-rot90"}


@slow
@pytest.mark.process
def test_compare_one_seed_is_delong_and_marks_a_zero_difference(runs) -> None:
    run = runs["worst"]
    a, b = "density_params = '{\"dim\": 6}'", "density_params = '{\"dim\": 2}'"
    records = json.loads(_cli("compare", str(run), "--a", a, "--b", b, "--format", "json").stdout)
    rows = [r for r in _rows(run) if r["split"] == "test"]
    kept = read_sample_scores(run / "results", "search", {r["trial_id"] for r in rows}).to_pandas()
    dim = {r["trial_id"]: json.loads(r["density_params"])["dim"] for r in rows}
    for r in records:
        k = kept[kept["ood_dataset"] == r["ood_dataset"]]
        arrays = {dim[t]: [g[g["side"] == s].sort_values("index")["score"].to_numpy() for s in ("id", "ood")]
                  for t, g in k.groupby("trial_id")}
        ref = delong(*arrays[6], *arrays[2])
        assert r["method"] == "delong" and r["seeds"] == 1
        assert (r["diff"], r["ci_low"], r["ci_high"]) == pytest.approx((ref.diff, ref.low, ref.high), abs=1e-9)
    same = _cli("compare", str(run), "--a", a, "--b", a).stdout  # A vs itself: 0, marked as not established
    assert all(cells[-1] == "yes (not established)" and float(cells[2]) == 0 for cells in _table(same).values())
    assert "paired test AUROC difference" in same and "(trial " in same


@slow
@pytest.mark.process
def test_compare_without_kept_scores_is_one_line_error(runs) -> None:
    p = _cli("compare", str(runs["near"]), "--a", "score = 'vim'", "--b", "score = 'vim'", ok=False)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("densitune: error: ") and "--keep-scores all" in p.stderr
