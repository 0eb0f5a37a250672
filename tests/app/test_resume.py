"""Caching across Ray actors, and resuming a search or training killed with SIGKILL."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densitune.results.store import read_results
from densitune.search.cache import DiskCache
from densitune.search.models import discover, select
from densitune.search.spec import SearchSpec
from densitune.search.tune import SearchRun, run_search

EPS = ["0", "0.001", "0.002", "0.005", "0.01", "0.02", "0.03", "0.05", "0.07", "0.1"]


@pytest.mark.ray
def test_six_trial_eps_search_extracts_and_fits_once(ray_session, trained_models, tmp_path):
    (group,) = select(discover(trained_models), (4,))  # one checkpoint
    spec = SearchSpec(experiment="cache", val_ood="digits-blend", test_ood=("noise-uniform",),
                      eps_grid=(0.0, 0.001, 0.002, 0.005, 0.01, 0.02), eval_limit=100)
    run = SearchRun(results_dir=str(tmp_path / "results"), storage_path=str(tmp_path / "tune"), cache_dir=str(tmp_path / "cache"))
    grid = run_search(spec, [group], run)
    assert len(grid) == 6 and all(r.error is None for r in grid)
    events = DiskCache(run.cache_dir).events()
    kinds = collections.Counter(kind for kind, _ in events)
    # train, ID val, validation OOD, ID test, test OOD: one extraction each; one density fit; not 6; and the
    # input-gradient sign of each evaluated split once for the 5 trials with ε > 0 (the ε cache)
    assert kinds == {"extract": 5, "fit": 1, "ipsign": 4}
    assert len({key for _, key in events}) == len(events)  # nothing computed twice
    # two actors ran trials (2 CPUs): the second found the first one's work on disk
    assert read_results(run.results_dir).num_rows == 6 * 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "densitune", *args]


def _wait_files(folder: Path, n: int, timeout: float = 180) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        files = list(folder.glob("*.parquet")) if folder.is_dir() else []
        if len(files) >= n:
            return len(files)
        time.sleep(0.2)
    raise AssertionError(f"no {n} result files in {folder} after {timeout}s")


def _kill(p: subprocess.Popen) -> None:
    os.kill(p.pid, signal.SIGKILL)  # the driver only, as a crash or `kill -9` would
    p.wait(timeout=30)


@pytest.mark.process
def test_killed_search_resumes_with_each_trial_once(trained_models, tmp_path):
    out = tmp_path / "run"
    args = ["search", "--out", str(out), "--models", str(trained_models), "-D", "4", "--density", "gmm_sum", "kde",
            "--eps-grid", *EPS, "--test-ood", "noise-uniform", "--num-cpus", "2", "-q"]
    p = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "results" / "experiment=search"
    _wait_files(part, 2)
    _kill(p)
    time.sleep(2)  # let in-flight trials of the dead driver end
    before = len(list(part.glob("*.parquet")))
    assert before < 20, "the search finished before it was killed; the test needs a longer grid"

    again = subprocess.run(_cli(*args), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already has results" in again.stderr  # no silent mixing

    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_results(out / "results", experiment="search").to_pylist()
    per_point = collections.Counter(r["search_params"] for r in rows)
    assert len(per_point) == 20  # 2 densities x 10 eps
    assert set(per_point.values()) == {2}  # each trial exactly once: its val row and its test row
    assert len(list(part.glob("*.parquet"))) == 20


@pytest.mark.process
def test_killed_training_resumes_with_each_epoch_once(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "-D", "4", "6", "--epochs", "6", "--num-cpus", "2", "-q"]
    p = subprocess.Popen(_cli(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "results" / "experiment=default"
    _wait_files(part, 3)
    _kill(p)
    time.sleep(2)
    assert len(list(part.glob("*.parquet"))) < 12
    done = subprocess.run(_cli(*args, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = read_results(out / "results", stage="train").to_pylist()
    per_epoch = collections.Counter((r["trial_id"], r["epoch"]) for r in rows)
    assert len(per_epoch) == 2 * 6 and set(per_epoch.values()) == {1}
    for name in ("cnn-D4-ce-s0-", "cnn-D6-ce-s0-"):
        (model,) = (out / "models" / "default").glob(f"{name}*/model.pt")


def test_resume_of_a_search_that_wrote_nothing_yet(tmp_path):
    from densitune.results.store import write_spec
    from densitune.search.tune import completed_trials

    assert completed_trials(str(tmp_path / "results"), "fresh") == {}
    write_spec(tmp_path / "results", "fresh", {"experiment": "fresh"})  # killed before the first trial ended
    assert completed_trials(str(tmp_path / "results"), "fresh") == {}
