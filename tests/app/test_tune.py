"""``densitune tune`` end to end on the embedded digits: real Ray Tune (OptunaSearch + ASHA), real training, real rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from densitune.cli import main
from densitune.results.store import read_results


def densitune(*args: object, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densitune", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def tune_rows(out) -> tuple[list[dict], list[dict]]:
    """(outer-trial rows, rung rows) of a run (none before its first row)."""
    if not (out / "results").is_dir():
        return [], []
    rows = read_results(out / "results", stage="tune").to_pylist()
    return [r for r in rows if r["tune_status"] != "rung"], [r for r in rows if r["tune_status"] == "rung"]


def train_epochs(out) -> Counter:
    """(network key, epoch) -> how many rows of stage train record it."""
    rows = read_results(out / "results", stage="train").to_pylist()
    return Counter((r["trial_id"], r["epoch"]) for r in rows)


BAD = {
    "D range upside down": (["--D-range", "64", "2"], "--D-range LO HI needs 1 <= LO < HI, got 64 2"),
    "unknown loss": (["-D", "8", "--loss", "hinge"], "unknown loss 'hinge'"),
    "bad rung point": (["--rung-grid", "gmm_sum:small"], "argument --rung-grid: 'gmm_sum:small' is not DENSITY:EPS"),
    "unknown rung density": (["--rung-grid", "parzen:0"], "unknown density 'parzen'"),
    "no networks": (["--num-networks", "0"], "--num-networks must be >= 1, got 0"),
    "lam range at 0": (["--lam-range", "0", "1"], "--lam-range LO HI needs 0 < LO < HI"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_exit_2_nothing_written(case, tmp_path, capsys):
    flags, text = BAD[case]
    try:
        status = main(["tune", "--out", str(tmp_path / "run"), *flags])
    except SystemExit as e:  # argparse's own usage errors
        status = e.code
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("densitune: error: ") and text in err[0]
    assert not (tmp_path / "run" / "results").exists() and not (tmp_path / "run" / "models").exists()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_tune_on_digits_draws_d_stops_weak_networks_and_best_reads_the_final_search(tmp_path):
    out = tmp_path / "run"
    p = densitune("tune", "--out", out, "--D-range", 2, 64, "--loss", "ce", "contrastive", "--num-networks", 8,
                  "--epochs", 9, "--num-cpus", 2, "--keep", 1, "--final-seeds", 2, "--eps-grid", 0, 0.01, "-q")
    assert p.returncode == 0, p.stderr
    trials, rung_rows = tune_rows(out)
    assert len(trials) == 8 and len({r["trial_id"] for r in trials}) == 8
    dims = {r["D"] for r in trials}
    assert len(dims) >= 2 and all(2 <= d <= 64 for d in dims) and any(d & (d - 1) for d in dims)
    stopped = [r for r in trials if r["tune_status"] == "stopped"]
    finished = [r for r in trials if r["tune_status"] == "finished"]
    assert stopped and finished and len(stopped) + len(finished) == 8
    assert all(r["epoch"] in (1, 3) for r in stopped) and all(r["epoch"] == 9 for r in finished)
    assert all(r["gpu_seconds"] == 0.0 for r in trials)  # no GPU on this machine
    assert all(r["center_loss"] is None for r in trials if r["loss"] == "ce")
    # every rung a trial reached was scored once, on validation only
    assert {r["split"] for r in rung_rows} == {"val"}
    for r in trials:
        reached = {x["epoch"] for x in rung_rows if x["trial_id"] == r["trial_id"]}
        assert max(reached) == r["epoch"] and reached <= {1, 3, 9}
    assert all(n == 1 for n in train_epochs(out).values())  # each (network, epoch) trained and recorded once
    winner = min(finished, key=lambda r: -r["objective"])
    key = json.loads(winner["search_params"])["network"]
    # --final-seeds 2: the winner's config trained on seed 1 too (the same key but the seed), all epochs
    seed1 = key.replace("-s0-", "-s1-").rsplit("-", 1)[0]
    assert sorted(e for (k, e) in train_epochs(out) if k.startswith(seed1 + "-")) == list(range(1, 10))
    final = read_results(out / "results", experiment="default-final", stage="search").to_pylist()
    assert {(r["D"], r["loss"]) for r in final} == {(winner["D"], winner["loss"])}  # --keep 1
    assert {r["seed"] for r in final if r["split"] == "val"} == {0, 1}
    best = densitune("best", out, "--json")
    assert best.returncode == 0, best.stderr
    chosen = json.loads(best.stdout)
    assert chosen["experiment"] == "default-final" and chosen["D"] == winner["D"] and chosen["loss"] == winner["loss"]
    assert densitune("report", out).returncode == 0
    view = densitune("report", out, "--view", "tune", "--format", "json")
    assert view.returncode == 0, view.stderr
    listed = json.loads(view.stdout)
    assert sorted((r["D"], r["status"], r["epochs"]) for r in listed) == sorted((r["D"], r["tune_status"], r["epoch"]) for r in trials)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_a_network_trained_before_is_reused_not_retrained(tmp_path):
    out = tmp_path / "run"
    t = densitune("train", "--out", out, "-D", 8, "--loss", "ce", "--epochs", 2, "--num-cpus", 2, "-q")
    assert t.returncode == 0, t.stderr
    (model,) = (out / "models" / "default").iterdir()
    before = (model / "model.pt").stat().st_mtime_ns, train_epochs(out)
    p = densitune("tune", "--out", out, "-D", 8, "--loss", "ce", "--num-networks", 1, "--epochs", 2, "--num-cpus", 2,
                  "--keep", 0, "-q")
    assert p.returncode == 0, p.stderr
    assert [d.name for d in (out / "models" / "default").iterdir()] == [model.name]  # same hash, no other network
    assert ((model / "model.pt").stat().st_mtime_ns, train_epochs(out)) == before  # no second training
    (trial,), rung_rows = tune_rows(out)
    params = json.loads(trial["search_params"])
    assert params["network"] == model.name and params["reused"] is True
    assert trial["tune_status"] == "finished" and trial["epoch"] == 2 and len(rung_rows) == 1


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_time_budget_stops_with_exit_2_and_resume_finishes_each_network_once(tmp_path):
    out = tmp_path / "run"
    flags = ["--out", out, "--D-range", 2, 64, "--loss", "ce", "--num-networks", 4, "--epochs", 3, "--num-cpus", 2,
             "--keep", 0, "-q"]
    p = densitune("tune", *flags, "--time-budget", 3)
    assert p.returncode == 2
    err = p.stderr.strip().splitlines()[-1]
    assert "time budget (3 s) stopped the tune after" in err and "--resume" in err
    recorded = len(tune_rows(out)[0])
    assert recorded < 4
    r = densitune("tune", *flags, "--resume")
    assert r.returncode == 0, r.stderr
    trials, _ = tune_rows(out)
    assert len(trials) == 4 and len({t["trial_id"] for t in trials}) == 4
    assert all(n == 1 for n in train_epochs(out).values())


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_swapping_every_test_set_changes_no_rung_no_stop_and_no_choice(tmp_path):
    """Leakage, end to end (one CPU: trials in turn, so the scheduler's decisions are reproducible): two tunes that
    differ only in their test OOD sets have the same rung objectives, stop the same networks and choose the same
    configuration. (tests/search/test_ondemand.py also makes the ID test split unreadable to the rungs.)"""
    seen = []
    for n, test_ood in enumerate((["digits-rot90", "noise-uniform"], ["photo-patches"])):
        out = tmp_path / f"run{n}"
        p = densitune("tune", "--out", out, "-D", 4, 8, 16, "--loss", "ce", "contrastive", "--num-networks", 4,
                      "--epochs", 3, "--num-cpus", 1, "--keep", 1, "--test-ood", *test_ood, "-q")
        assert p.returncode == 0, p.stderr
        trials, rung_rows = tune_rows(out)
        best = densitune("best", out, "--json")
        assert best.returncode == 0, best.stderr
        chosen = {k: v for k, v in json.loads(best.stdout).items()
                  if k in ("D", "loss", "center_loss", "score", "density", "density_params", "eps")}
        seen.append((sorted((json.loads(r["search_params"])["network"], r["epoch"], r["eps"], r["ood_dataset"], r["objective"])
                            for r in rung_rows),
                     sorted((r["D"], r["loss"], r["tune_status"], r["epoch"]) for r in trials), chosen))
    assert seen[0] == seen[1]
    assert len(seen[0][1]) == 4 and seen[0][2]["D"] in (4, 8, 16)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_killed_tune_resumes_with_each_network_once(tmp_path):
    out = tmp_path / "run"
    args = ["tune", "--out", str(out), "--D-range", "2", "64", "--loss", "ce", "contrastive", "--num-networks", "6",
            "--epochs", "3", "--num-cpus", "2", "--keep", "0", "-q"]
    p = subprocess.Popen([sys.executable, "-m", "densitune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    part = out / "results" / "experiment=default"
    t0 = time.monotonic()
    while not list(part.glob("tune-*-trial.parquet")) and time.monotonic() - t0 < 300:
        time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)  # the driver only, as a crash or `kill -9` would
    p.wait(timeout=30)
    time.sleep(2)
    recorded = len(tune_rows(out)[0])
    assert 1 <= recorded < 6
    done = densitune(*args, "--resume")
    assert done.returncode == 0, done.stderr[-2000:]
    trials, rung_rows = tune_rows(out)
    assert len(trials) == 6 and len({t["trial_id"] for t in trials}) == 6
    assert all(n == 1 for n in train_epochs(out).values())  # each (network, epoch) once, the killed ones continued
    assert Counter((r["trial_id"], r["epoch"], r["eps"], r["ood_dataset"]) for r in rung_rows
                   if r["trial_id"] in {t["trial_id"] for t in trials}).most_common(1)[0][1] == 1


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_tune_into_a_bucket(s3_bucket):
    """``--out s3://...`` on a loopback S3 server (moto): networks, rung checkpoints, rows and the final search all
    land in the bucket, and `best` / `report --view tune` read them back from it."""
    from densitune.run.runstore import location

    run = f"{s3_bucket}/run"
    p = densitune("tune", "--out", run, "-D", 4, 8, "--loss", "ce", "--num-networks", 3, "--epochs", 3,
                  "--num-cpus", 2, "--keep", 1, "-q")
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_results(f"{run}/results", stage="tune").to_pylist()
    trials = [r for r in rows if r["tune_status"] != "rung"]
    assert len(trials) == 3 and {r["D"] for r in trials} <= {4, 8}
    finished = {json.loads(r["search_params"])["network"] for r in trials if r["tune_status"] == "finished"}
    assert finished and all((location(run) / "models" / "default" / key / "model.pt").is_file() for key in finished)
    assert all(c.startswith(run) for r in rows for c in r["checkpoints"] or [])
    best = densitune("best", run, "--json")
    assert best.returncode == 0 and json.loads(best.stdout)["experiment"] == "default-final", best.stderr
    assert densitune("report", run, "--view", "tune").returncode == 0
