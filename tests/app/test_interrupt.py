"""Ctrl-C (a real SIGINT to a real ``densitune`` process) exits 130, reports no success, and names the
``--resume`` command, which then finishes the run with every row exactly once."""

from __future__ import annotations

import collections
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from densitune.results.store import read_results

pytestmark = pytest.mark.process

EPS = ["0", "0.001", "0.002", "0.005", "0.01", "0.02", "0.03", "0.05", "0.07", "0.1"]


def _env() -> dict[str, str]:
    # A private Ray temp folder (short: Ray's socket paths are length-limited): a plain `ray.init()`
    # would join any other Ray instance started on this machine.
    return {**os.environ, "RAY_TMPDIR": tempfile.mkdtemp(prefix="r", dir="/tmp")}


def _interrupt(args: list[str], folder: Path, n: int, timeout: float = 240,
               sig: int = signal.SIGINT) -> subprocess.CompletedProcess:
    """Start ``densitune ARGS``, wait for ``n`` Parquet files in ``folder``, send ``sig``, collect its output."""
    p = subprocess.Popen([sys.executable, "-m", "densitune", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env=_env())
    t0 = time.monotonic()
    while len(list(folder.glob("*.parquet")) if folder.is_dir() else []) < n:
        assert p.poll() is None, p.communicate()
        assert time.monotonic() - t0 < timeout, f"no {n} result files in {folder}"
        time.sleep(0.2)
    os.kill(p.pid, sig)  # SIGINT: what Ctrl-C sends; SIGTERM: ray job stop, timeout, schedulers, Kubernetes
    out, err = p.communicate(timeout=120)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def _resume_argv(stderr: str) -> list[str]:
    """The command the interruption message names."""
    line = next(ln for ln in stderr.splitlines() if ln.startswith("densitune: interrupted"))
    command = shlex.split(line.split("continue with: ", 1)[1])
    assert command[0] == "densitune" and "--resume" in command
    return command[1:]


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densitune", *argv], capture_output=True, text=True, timeout=400, env=_env())


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_a_signal_during_train_exits_honestly_and_resume_finishes_every_epoch_once(tmp_path, sig, code):
    out = tmp_path / "run"
    args = ["train", "--out", str(out), "-D", "4", "6", "--epochs", "6", "--num-cpus", "2"]
    part = out / "results" / "experiment=default"
    cut = _interrupt(args, part, 3, sig=sig)
    assert cut.returncode == code, cut.stderr[-2000:]
    lines = [ln for ln in cut.stderr.replace("\r", "\n").splitlines() if ln.strip() and not ln.startswith("train |")]
    assert len(lines) == 1 and lines[0].startswith("densitune: interrupted: "), lines  # nothing from Ray
    assert "trained 2 model(s)" not in cut.stdout and "Tuner.restore" not in cut.stdout + cut.stderr
    assert "0 of 2 model(s) trained" in cut.stderr or "1 of 2 model(s) trained" in cut.stderr
    resume = _resume_argv(cut.stderr)
    assert resume == [*args, "--resume"]
    before = len(list(part.glob("*.parquet")))
    assert 3 <= before < 12

    done = _run(resume)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "trained 2 model(s)" in done.stdout
    rows = read_results(out / "results", stage="train").to_pylist()
    per_epoch = collections.Counter((r["trial_id"], r["epoch"]) for r in rows)
    assert len(rows) == 2 * 6 and len(per_epoch) == 2 * 6 and set(per_epoch.values()) == {1}
    for name in ("cnn-D4-ce-s0-", "cnn-D6-ce-s0-"):  # the key ends in the config's hash
        assert len(list((out / "models" / "default").glob(f"{name}*/model.pt"))) == 1
    assert "epoch 6/6" in (out / "densitune.log").read_text()  # per-epoch detail goes to the run's log


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["sigint", "sigterm"])
def test_a_signal_during_search_exits_honestly_and_resume_runs_every_trial_once(trained_models, tmp_path, sig, code):
    out = tmp_path / "run"
    args = ["search", "--out", str(out), "--models", str(trained_models), "-D", "4", "--density", "gmm_sum", "kde",
            "--eps-grid", *EPS, "--test-ood", "noise-uniform", "--num-cpus", "2"]
    part = out / "results" / "experiment=search"
    cut = _interrupt(args, part, 2, sig=sig)
    assert cut.returncode == code, cut.stderr[-2000:]
    assert "best configuration" not in cut.stdout and "search finished" not in cut.stdout
    assert "Tuner.restore" not in cut.stdout + cut.stderr
    finished = len(list(part.glob("*.parquet")))
    if sig == signal.SIGINT:  # Ray stopped before the account: exact
        assert f"{finished} of 20 search trial(s) finished" in cut.stderr
    else:  # the account first (SIGKILL may follow SIGTERM within seconds): a trial may land after it
        said = int(cut.stderr.split("densitune: interrupted: ", 1)[1].split(" of 20 search trial(s) finished")[0])
        assert said <= finished <= said + 2
    assert finished < 20, "the search finished before the interrupt; the test needs a longer grid"
    resume = _resume_argv(cut.stderr)
    assert resume == [*args, "--resume"]

    done = _run(resume)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "best configuration" in done.stdout and "search finished: 20 trial(s)" in done.stdout
    rows = read_results(out / "results", experiment="search").to_pylist()
    per_point = collections.Counter(r["search_params"] for r in rows)
    assert len(per_point) == 20 and set(per_point.values()) == {2}  # each trial once: a val row and a test row
    assert len(rows) == 40 and len(list(part.glob("*.parquet"))) == 20


@pytest.mark.slow
def test_failed_training_trial_is_one_line_with_the_account_and_no_traceback(tmp_path):
    out = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "densitune", "train", "--out", str(out), "-D", "4", "--epochs", "1",
                        "--lr", "1e30", "--num-cpus", "2"], capture_output=True, text=True, timeout=400, env=_env())
    assert p.returncode == 2 and "trained 1 model(s)" not in p.stdout
    errors = [ln for ln in p.stderr.splitlines() if ln.startswith("densitune: ")]
    # a diverged loss would diverge again: not retried, the run stops at once (densitune.run.failures)
    assert len(errors) == 1 and errors[0].startswith("densitune: error: training stopped at a trial that would fail again")
    assert "0 of 1 model(s) trained" in errors[0] and errors[0].endswith("--lr 1e30 --num-cpus 2 --resume")
    assert "Traceback" not in p.stderr  # Tune's traceback is in the run's log instead
    assert "FloatingPointError" in (out / "densitune.log").read_text()
