"""A lost node costs only time: a 3-node Ray cluster on this machine loses the worker that runs a trial, during
training and during a search; the command still exits 0 with every row exactly once and the same numbers. The
same with the run in a bucket on a loopback S3 server, so no shared disk hides a missing upload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.process]


def _rows(run: str) -> list[dict]:
    from densitune.errors import ResultsError
    from densitune.results.store import read_results

    try:
        return read_results(f"{run}/results").to_pylist()
    except ResultsError:  # nothing written yet
        return []


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d.name))
    return out


def _busy(node) -> bool:
    """Whether a Tune trial actor is running on ``node`` (a worker process of its raylet titled ray::...)."""
    import ray._private.ray_constants as rc

    raylet = node.all_processes[rc.PROCESS_TYPE_RAYLET][0].process.pid
    for pid in _children(raylet):
        try:
            title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::") and "IDLE" not in title and ".train" in title:
            return True
    return False


def _failures(run: str, prefix: str) -> dict[str, int]:
    """trial name (network key or grid point) -> Tune's failure count, from Tune's experiment state."""
    from densitune.run.runstore import glob, location

    (state,) = glob(location(run) / "tune", f"{prefix}*/experiment_state-*.json")[-1:]
    out = {}
    for trial_json, meta_json in json.loads(state.read_text())["trial_data"]:
        cfg = json.loads(trial_json)["config"]
        out[cfg.get("key") or cfg.get("point")] = json.loads(meta_json)["num_failures"]
    return out


def _kill_busy_worker(cluster, workers, proc, deadline_s: float = 300):
    """Remove the first worker node seen running a trial; returns it (None if the command ended first)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline and proc.poll() is None:
        for node in workers:
            if _busy(node):
                cluster.remove_node(node, allow_graceful=False)
                workers.remove(node)
                return node
        time.sleep(0.05)
    return None


@pytest.fixture(params=["local", "s3"])
def run(request, tmp_path) -> str:
    """Where the run lives: a local folder, or a bucket on the loopback S3 server (its environment is set before
    the cluster starts, so every node's workers reach the bucket as a cluster's nodes would)."""
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


@pytest.fixture
def cluster(run):
    from ray.cluster_utils import Cluster

    with tempfile.TemporaryDirectory(prefix="rc", dir="/tmp") as tmp:
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp,
                                    "object_store_memory": 100 * 1024 * 1024})
        workers = [c.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024) for _ in range(2)]
        c.wait_for_nodes()
        try:
            yield c, workers, tmp
        finally:
            c.shutdown()


def _cli(args: list[str], cwd: Path, tmp: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "densitune", *args], cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "RAY_TMPDIR": tmp})


def test_training_and_search_survive_the_loss_of_a_worker_node(tmp_path, run, cluster):
    c, workers, tmp = cluster
    common = ["--address", c.address, "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--out", run]

    # --- training: 2 networks x 8 epochs, one per worker; the node of one dies mid-run
    train = _cli(["train", *common, "-D", "4", "8", "--epochs", "8", "--experiment", "n"], tmp_path, tmp)
    while train.poll() is None and not any(r["epoch"] >= 2 for r in _rows(run) if r["stage"] == "train"):
        time.sleep(0.2)
    lost = _kill_busy_worker(c, workers, train)
    c.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)  # the autoscaler's replacement
    out, err = train.communicate(timeout=900)
    assert lost is not None, "no trial was running on a worker when the command ended"
    assert train.returncode == 0, err[-3000:]
    epochs = Counter((r["trial_id"], r["epoch"]) for r in _rows(run) if r["stage"] == "train")
    assert sorted(epochs) == [(k, e) for k in sorted({k for k, _ in epochs}) for e in range(1, 9)]
    assert set(epochs.values()) == {1} and len({k for k, _ in epochs}) == 2
    failures = _failures(run, "train-n")
    assert sorted(failures.values()) == [0, 1]  # the lost trial failed once and was restored

    # --- search over both networks; a worker dies while it runs a search trial
    grid = ["--eps-grid", "0", "0.01", "0.02", "--density", "gmm_sum", "kde", "--experiment", "s"]
    search = _cli(["search", *common, *grid], tmp_path, tmp)
    lost = _kill_busy_worker(c, workers, search)
    c.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
    out, err = search.communicate(timeout=900)
    assert lost is not None, "no search trial was running on a worker when the command ended"
    assert search.returncode == 0, err[-3000:]
    assert 1 in _failures(run, "search-s").values()
    disturbed = _rows(run)
    # An undisturbed run of the same search, on a plain local Ray, gives the same numbers.
    calm = subprocess.run([sys.executable, "-m", "densitune", "search", "--out", str(run), "--models", f"{run}/models",
                           "--num-cpus", "2", *grid[:-1], "calm"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "RAY_TMPDIR": tmp})
    assert calm.returncode == 0, calm.stderr[-3000:]

    def values(rows: list[dict], experiment: str) -> dict:
        out = Counter()
        table = {}
        for r in rows:
            if r["experiment"] == experiment:
                key = (tuple(r["checkpoints"]), r["density"], r["eps"], r["ood_dataset"], r["split"], r["seed"])
                out[key] += 1
                table[key] = (r["auroc"], r["auprc"], r["fpr95"], r["objective"])
        assert set(out.values()) == {1}  # every grid point once
        return table

    after = _rows(run)
    assert values(disturbed, "s") == values(after, "calm")
    assert len(values(disturbed, "s")) == 2 * 2 * 3 * 5  # networks x densities x eps x (1 val + 4 test sets)
