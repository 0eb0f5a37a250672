"""A results folder that becomes unwritable mid-run stops the run at the first failed write (real Ray, real chattr)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from densitune.results.store import read_results


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def _immutable_works(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    if shutil.which("chattr") is None or not _chattr("+i", probe):
        return False
    try:
        (probe / "x").touch()
        return False  # the file system ignores the flag
    except OSError:
        return True
    finally:
        _chattr("-i", probe)


@pytest.mark.slow
@pytest.mark.process
def test_results_folder_unwritable_mid_run_stops_at_first_failed_write(trained_models, tmp_path):
    if not _immutable_works(tmp_path):
        pytest.skip("chattr +i is not available on this file system")
    out = tmp_path / "run"
    exp_dir = out / "results" / "experiment=search"
    eps = ["0"] + [f"0.00{i}" for i in range(1, 10)] + ["0.01", "0.02"]  # 12 grid points, one model group
    argv = [sys.executable, "-m", "densitune", "search", "--out", str(out), "--models", str(trained_models), "-D", "4",
            "--eps-grid", *eps, "--test-ood", "noise-uniform", "--eval-limit", "40", "--max-concurrent", "1",
            "--num-cpus", "2", "-q"]
    err_file = tmp_path / "stderr.txt"
    with open(err_file, "w") as err:
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
    frozen_at = None
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and proc.poll() is None:
            if exp_dir.is_dir() and len(list(exp_dir.glob("search-*.parquet"))) >= 3:
                assert _chattr("+i", exp_dir)  # from now on nothing can be created or renamed in it
                frozen_at = time.time()
                break
            time.sleep(0.05)
        proc.wait(timeout=500)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _chattr("-i", exp_dir)
    stderr = err_file.read_text()
    assert frozen_at is not None, stderr[-3000:]
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    assert lines[0].startswith(f"densitune: error: cannot write {exp_dir}") and "Operation not permitted" in lines[0]
    written = read_results(out / "results", experiment="search")
    n_ok = len(set(written.column("trial_id").to_pylist()))
    assert 3 <= n_ok < 12
    # Tune's own record of every trial it started: one folder with params.json per started trial.
    tune_dir = out / "tune" / "search-search"
    started = sorted(tune_dir.glob("*/params.json"))
    # with one trial at a time: the trials that wrote their rows, plus the one whose write failed; none after it
    assert len(started) == n_ok + 1, [p.parent.name for p in started]
    state = max(tune_dir.glob("experiment_state-*.json"))
    trials = json.loads(state.read_text())["trial_data"]
    statuses = [json.loads(t[0])["status"] if isinstance(t, list) else None for t in trials]
    assert "RUNNING" not in statuses and "PENDING" not in statuses
    # the trial whose write failed reported it as fatal (densitune.run.failures), so Tune did not retry it
    fatal = [p for p in tune_dir.glob("*/result.json") if '"fatal_error": "cannot write' in p.read_text()]
    assert len(fatal) == 1
    # every row was started before the folder froze
    starts = [t.timestamp() for t in written.column("started_at").to_pylist()]
    assert max(starts) <= frozen_at
