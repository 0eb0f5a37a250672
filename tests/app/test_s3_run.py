"""A whole run on a bucket: train + search + report + compact with ``--out s3://bucket/run`` on a real
S3-compatible server (moto, its own process on loopback) gives the same rows as the same commands on a local
folder; with HOME, the working directory and the temp dir pointed at fresh folders, the bucket run writes
nothing under HOME or the working directory; and two searches on one experiment of the bucket run: one runs,
the other exits 2 naming the holder (slow: real Ray runs)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import S3_SECRET

pytestmark = [pytest.mark.slow, pytest.mark.process]

TRAIN = ["train", "--experiment", "t", "-D", "4", "--seeds", "0", "1", "--epochs", "2", "--num-cpus", "2", "-q"]
SEARCH = ["search", "--experiment", "s", "--score", "density", "ensemble_msp", "--density", "gmm_sum", "kde",
          "--eps-grid", "0", "0.01", "--eval-limit", "100", "--num-cpus", "2", "-q"]
#: Columns that differ between two identical runs: wall-clock, the Ray node id, where the run lives.
VOLATILE = ("started_at", "duration_s", "node", "checkpoints")


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    p = subprocess.run([sys.executable, "-m", "densitune", *args], env=env, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"densitune {' '.join(args[:1])} exited {p.returncode}: {p.stderr[-3000:]}"
    return p


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _comparable(run: str) -> dict[tuple, dict]:
    """Every row of the run, keyed by what identifies it, without the columns that differ between two runs."""
    from densitune.results.store import read_results

    out = {}
    for r in read_results(run + "/results").to_pylist():
        r["checkpoints"] = tuple(c.removeprefix(run) for c in (r["checkpoints"] or []))
        # A search trial's id is Tune's (random); the trial is what it searched: its parameters and networks.
        trial = r["trial_id"] if r["stage"] == "train" else (r["search_params"], r["checkpoints"])
        key = (r["experiment"], r["stage"], trial, r["split"], r["ood_dataset"], r["seed"], r["epoch"])
        assert key not in out, f"row twice: {key}"
        out[key] = {k: v for k, v in r.items()
                    if (k not in VOLATILE or k == "checkpoints") and not (k == "trial_id" and r["stage"] == "search")}
    return out


def _differences(a: dict, b: dict) -> list[str]:
    diffs = [f"only in one run: {k}" for k in set(a) ^ set(b)]
    for k in sorted(set(a) & set(b), key=repr):
        cols = [c for c in a[k] if a[k][c] != b[k][c]]
        if cols:
            diffs.append(f"{k}: " + ", ".join(f"{c} {a[k][c]!r} != {b[k][c]!r}" for c in cols))
    return diffs


def test_the_same_run_on_a_local_folder_and_on_a_bucket_gives_the_same_rows(tmp_path, s3_bucket, s3_server):
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    tmp = tempfile.mkdtemp(prefix="s3", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **s3_server.env, "HOME": str(home), "TMPDIR": tmp, "RAY_TMPDIR": tmp}
    env.pop("XDG_CACHE_HOME", None)
    env.pop("MPLCONFIGDIR", None)
    runs = {"local": str(tmp_path / "run"), "s3": f"{s3_bucket}/run"}
    printed = {}
    for where, run in runs.items():
        _cli(*TRAIN, "--out", run, env=env, cwd=cwd)
        _cli(*SEARCH, "--out", run, env=env, cwd=cwd)
        before = _comparable(run)
        printed[where] = _cli("report", run, env=env, cwd=cwd).stdout.replace(run, "RUN")
        compacted = _cli("compact", run, env=env, cwd=cwd).stdout
        assert "files merged into one" in compacted
        assert _comparable(run) == before  # compaction changes files, never rows
        if where == "s3":
            assert _files(home) == [] and _files(cwd) == [], "the bucket run wrote under HOME or the working directory"
    rows = _comparable(runs["local"])
    assert len(rows) > 20
    assert _differences(rows, _comparable(runs["s3"])) == []
    assert printed["local"] == printed["s3"]

    objects = s3_server.objects(s3_bucket.removeprefix("s3://"))
    keys = list(objects)
    for part in ("run/models/t/", "run/results/experiment=t/", "run/results/experiment=s/", "run/tune/", "run/optuna/"):
        assert any(k.startswith(part) for k in keys), f"nothing under {part} in the bucket"
    locks = [k for k in keys if k.startswith("run/locks/") and not k.endswith("/")]  # "dir/": pyarrow's folder marker
    assert locks == []  # every writer lock released
    assert not any(S3_SECRET.encode() in body for body in objects.values())
    for log in Path(tmp).rglob("densitune.log"):
        assert S3_SECRET not in log.read_text(errors="replace")

    import optuna

    from densitune.results.store import read_results
    from densitune.search.optuna_study import journal_path, open_storage

    trials = {r["trial_id"] for r in read_results(runs["s3"] + "/results", experiment="s", stage="search").to_pylist()}
    study = optuna.load_study(study_name="s", storage=open_storage(journal_path(runs["s3"] + "/results", "s")))
    assert sorted(t.user_attrs["trial_id"] for t in study.trials) == sorted(trials)  # every trial, mirrored once


def test_two_searches_on_one_experiment_of_a_bucket_run(tmp_path, s3_bucket, s3_server, trained_models):
    tmp = tempfile.mkdtemp(prefix="s3", dir="/tmp")
    env = {**os.environ, **s3_server.env, "RAY_TMPDIR": tmp}
    run = f"{s3_bucket}/run"
    args = ["search", "--out", run, "--models", str(trained_models / "t"), "--num-cpus", "2",
            "--sampler", "tpe", "--num-samples", "4", "--eps-range", "0.001", "0.05", "--experiment", "e"]
    popen = lambda: subprocess.Popen([sys.executable, "-m", "densitune", *args], env=env, cwd=tmp_path, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = popen()
    client, bucket = s3_server.client(), s3_bucket.removeprefix("s3://")

    def locked() -> bool:
        return client.list_objects_v2(Bucket=bucket, Prefix="run/locks/e.json").get("KeyCount", 0) > 0

    deadline = time.monotonic() + 120
    while not locked() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert locked(), first.communicate()[1][-2000:]
    second = popen()
    out2, err2 = second.communicate(timeout=300)
    out1, err1 = first.communicate(timeout=900)
    assert first.returncode == 0, err1[-3000:]
    assert second.returncode == 2, err2[-2000:]
    lines = [ln for ln in err2.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"is being written by pid {first.pid} on {socket.gethostname()}" in lines[0]

    from densitune.results.store import read_results

    rows = read_results(run + "/results", experiment="e").to_pylist()
    trials = Counter(r["trial_id"] for r in rows if r["split"] == "val")
    assert len(trials) == 4 and len(set(trials.values())) == 1  # TPE within its budget, each trial once
    assert not locked()
    assert not [k for k in s3_server.objects(bucket) if k.startswith("run/locks/") and not k.endswith("/")]
