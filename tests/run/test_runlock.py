"""One writer per experiment: a second `densitune search` on the same run and experiment exits 2 naming the
holder, a lock left by a killed driver is taken over, and a killed first write never blocks the run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densitune.run.runlock import LockedError, writer_lock


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "densitune", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, **env})


def _search_rows(run: Path, experiment: str) -> list[dict]:
    folder = run / "results" / f"experiment={experiment}"
    return [r for f in folder.glob("*.parquet") if not f.name.startswith(".") for r in pq.read_table(f).to_pylist()]


def _ray_pids(temp_dir: str) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    out.append(int(d.name))
            except OSError:
                pass
    return out


@pytest.fixture
def short_tmp():
    with tempfile.TemporaryDirectory(prefix="rl", dir="/tmp") as d:  # Ray's socket paths must stay short
        yield d
        for pid in _ray_pids(d):  # what a SIGKILLed driver left running: this test's Ray only
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_lock_records_the_holder_and_refuses_a_second_writer(tmp_path):
    with writer_lock(tmp_path, "search", "e") as path:
        info = json.loads(path.read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        assert info["command"] == "search --experiment e"
        with pytest.raises(LockedError, match=f"being written by pid {os.getpid()} on {socket.gethostname()}"):
            with writer_lock(tmp_path, "train", "e"):
                pass
        with writer_lock(tmp_path, "search", "other"):  # another experiment of the same run is free
            pass
    assert not (tmp_path / "locks").exists()  # released, nothing left behind


@pytest.mark.process
def test_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "locks").mkdir()
    (tmp_path / "locks" / "e.json").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "command": "search", "started_at": "then"}))
    with writer_lock(tmp_path, "search", "e") as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_lock_of_another_host_expires_unless_renewed(tmp_path, monkeypatch):
    import densitune.run.runlock as rl

    (tmp_path / "locks").mkdir()
    lock = tmp_path / "locks" / "e.json"
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "search", "started_at": "then"}))
    with pytest.raises(LockedError, match="pid 1 on elsewhere"):  # fresh: its holder may be alive
        with writer_lock(tmp_path, "search", "e"):
            pass
    old = time.time() - rl.LEASE_S - 1
    os.utime(lock, (old, old))  # not renewed for longer than the lease
    with writer_lock(tmp_path, "search", "e") as path:
        assert json.loads(path.read_text())["host"] == socket.gethostname()


@pytest.mark.process
def test_two_searches_on_one_experiment_one_runs_the_other_exits_2(tmp_path, trained_models, short_tmp):
    env = {"RAY_TMPDIR": short_tmp}
    run = tmp_path / "run"
    args = ["search", "--out", str(run), "--models", str(trained_models / "t"), "--num-cpus", "2",
            "--sampler", "tpe", "--num-samples", "4", "--eps-range", "0.001", "0.05", "--experiment", "e"]
    first = _cli(*args, cwd=tmp_path, env=env)
    lock = run / "locks" / "e.json"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()[1][-2000:]
    second = _cli(*args, cwd=tmp_path, env=env)
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2
    lines = [ln for ln in err2.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"is being written by pid {first.pid} on {socket.gethostname()}" in lines[0]
    rows = _search_rows(run, "e")
    trials = Counter(r["trial_id"] for r in rows if r["split"] == "val")
    assert len(trials) == 4  # TPE within its budget, each trial once
    assert not lock.exists()


@pytest.mark.process
def test_stale_temp_file_of_a_killed_first_write_blocks_nothing(tmp_path, trained_models, short_tmp):
    """A search killed during its first Parquet write leaves `.tmp-*.parquet`; a fresh start and --resume work."""
    env = {"RAY_TMPDIR": short_tmp}
    run = tmp_path / "run"
    part = run / "results" / "experiment=e"
    part.mkdir(parents=True)
    stale = part / ".tmp-12345-abcdef01-search-p-0123456789abcdef.parquet"
    stale.write_bytes(b"PAR1 half a file")
    args = ["search", "--out", str(run), "--models", str(trained_models / "t"), "--num-cpus", "2", "-D", "8",
            "--eps-grid", "0", "0.01", "--experiment", "e"]
    resumed = _cli(*args, "--resume", cwd=tmp_path, env=env)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-3000:]
    assert not stale.exists()  # the lock holder cleaned it up
    assert len({r["trial_id"] for r in _search_rows(run, "e")}) == 2
    # the same with a fresh start (no --resume) in a new experiment folder holding only a stale file
    part2 = run / "results" / "experiment=f"
    part2.mkdir()
    (part2 / stale.name).write_bytes(b"PAR1 half a file")
    fresh = _cli(*args[:-1], "f", cwd=tmp_path, env=env)
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err[-3000:]
    assert len({r["trial_id"] for r in _search_rows(run, "f")}) == 2


@pytest.mark.slow
@pytest.mark.process
def test_killed_driver_leaves_a_lock_that_resume_takes_over(tmp_path, trained_models, short_tmp):
    env = {"RAY_TMPDIR": short_tmp}
    run = tmp_path / "run"
    args = ["search", "--out", str(run), "--models", str(trained_models / "t"), "--num-cpus", "2",
            "--eps-grid", "0", "0.005", "0.01", "0.02", "--experiment", "k"]
    first = _cli(*args, cwd=tmp_path, env=env)
    deadline = time.monotonic() + 300
    while not _search_rows(run, "k") and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=60)
    assert (run / "locks" / "k.json").exists()  # nobody released it
    again = _cli(*args, "--resume", cwd=tmp_path, env=env)
    _, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "taking over the lock of k" in err
    rows = _search_rows(run, "k")
    per_trial = Counter((r["search_params"], r["ood_dataset"], r["split"], r["seed"]) for r in rows)
    assert set(per_trial.values()) == {1} and len({r["search_params"] for r in rows}) == 2 * 4  # 2 groups x 4 eps


@pytest.mark.ray
def test_retraining_with_other_epochs_makes_a_second_network(tmp_path, capsys):
    """`train --epochs 2` after `--epochs 3` on the same run: both networks exist, rows never mix, nothing is
    overwritten; `list-models` shows both."""
    from densitune.cli import main

    run = tmp_path / "run"
    common = ["train", "--out", str(run), "-D", "4", "--num-cpus", "2", "-q"]
    assert main([*common, "--epochs", "3"]) == 0
    first = sorted((run / "models" / "default").iterdir())
    weights = {p: (p / "model.pt").read_bytes() for p in first}
    assert main([*common, "--epochs", "2"]) == 0
    both = sorted((run / "models" / "default").iterdir())
    assert len(first) == 1 and len(both) == 2 and set(first) < set(both)
    assert all((p / "model.pt").read_bytes() == w for p, w in weights.items())  # not overwritten
    rows = [r for f in (run / "results").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
    epochs = {}
    for r in rows:
        epochs.setdefault(r["trial_id"], []).append(r["epoch"])
    assert sorted(sorted(e) for e in epochs.values()) == [[1, 2], [1, 2, 3]]  # one network's rows each
    capsys.readouterr()
    assert main(["list-models", str(run), "--format", "csv"]) == 0
    listed = capsys.readouterr().out
    assert all(p.name in listed for p in both) and "3/3" in listed and "2/2" in listed
