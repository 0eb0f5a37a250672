"""The README's job-submission recipe on a real multi-process cluster (issue 24, build 5).

A head (no CPUs, the dashboard's job server) and two workers, each started by ``ray start`` with its own temp dir
and ports, token authentication on; every node has the S3 credentials of a loopback moto server in its own
environment (as an instance role would give them), none travels with the job. ``ray job submit --working-dir``
(the repository, as a user submits it) runs ``densitune train`` and ``densitune search --address auto`` into a
bucket. A worker's raylet is SIGKILLed while it runs a search trial: the job still SUCCEEDS, with each grid point
recorded once. Then a search job is stopped with ``ray job stop`` (SIGTERM to the driver: STOPPED, the account
and the ``--resume`` hint in its logs) and a ``--resume`` job finishes it, again each trial once.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
from ray_procs import flag_value, free_ports, marked, node_ports, ray_pids, ray_start, stop_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[2]
GRID = ["--density", "gmm_sum", "--eps-grid", "0", "0.002", "0.005", "0.01", "0.02", "0.05"]
POINTS = 2 * 6  # networks x eps


def _rows(run: str, experiment: str) -> list[dict]:
    from densitune.errors import ResultsError
    from densitune.results.store import read_results

    try:
        return read_results(f"{run}/results", experiment=experiment).to_pylist()
    except ResultsError:  # nothing written yet
        return []


def _points(rows: list[dict]) -> Counter:
    """(networks, eps) of each search trial -> how many trials recorded it (its validation row counts once)."""
    return Counter((tuple(r["checkpoints"]), r["eps"]) for r in rows if r["split"] == "val")


class Cluster:
    """A head and two workers of ``ray start``; :meth:`stop` signals only their processes, by PID."""

    def __init__(self, tmp: str, env: dict[str, str]) -> None:
        self.tmp, self.env = tmp, env
        self.dirs = {name: os.path.join(tmp, name) for name in ("h", "w1", "w2")}
        ports = free_ports()
        head = node_ports(ports, head=True, workers=16)
        self.gcs = f"127.0.0.1:{flag_value(head, 'port')}"
        self.dashboard = f"http://127.0.0.1:{flag_value(head, 'dashboard-port')}"
        ray_start(self.dirs["h"], "--head", "--num-cpus=0", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                  "--dashboard-host=127.0.0.1", "--object-store-memory=100000000", *head, env=env)
        for name in ("w1", "w2"):
            ray_start(self.dirs[name], f"--address={self.gcs}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                      "--object-store-memory=100000000", *node_ports(ports, head=False), env=env)

    def raylet(self, name: str) -> int:
        (pid,) = [p for p in ray_pids(self.dirs[name]) if _argv0(p).endswith("/raylet")]
        return pid

    def busy(self, name: str) -> bool:
        """Whether a trial runs on node ``name`` (a worker process of its raylet titled ray::....train)."""
        return any(_argv0(p).startswith("ray::") and ".train" in _argv0(p) for p in _children(self.raylet(name)))

    def kill_raylet(self, name: str) -> None:
        """SIGKILL node ``name``'s raylet (its agents and workers, which may outlive it, carry the nodes' mark)."""
        os.kill(self.raylet(name), signal.SIGKILL)

    def job(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "job", *args], capture_output=True,
                              text=True, env=self.env, timeout=600, cwd=ROOT)

    def submit(self, sid: str, *densitune: str) -> None:
        """``ray job submit`` as README's recipe has it: the repository as working dir, densitune on the cluster."""
        p = self.job("submit", "--address", self.dashboard, "--submission-id", sid, "--no-wait", "--working-dir", ".",
                     "--", "densitune", *densitune)
        assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]

    def status(self, sid: str) -> str:
        """The job's status from the job server's REST API, with the cluster's token (this process's own Ray client
        would use the auth settings Ray read when it was first imported here)."""
        request = urllib.request.Request(f"{self.dashboard}/api/jobs/{sid}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=60) as reply:  # noqa: S310 - loopback
            return str(json.loads(reply.read())["status"])

    def wait(self, sid: str, timeout: float = 1200) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while (status := self.status(sid)) not in ("SUCCEEDED", "FAILED", "STOPPED") and time.monotonic() < deadline:
            time.sleep(2)
        return status, self.job("logs", "--address", self.dashboard, sid).stdout

    def stop(self) -> None:
        stop_ray(self.tmp)


def _argv0(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


@pytest.fixture
def cluster(s3_server):
    token = secrets.token_hex(32)
    env = {**os.environ, **s3_server.env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    tmp = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # Ray's socket paths must stay short
    env = marked(env, tmp)
    c = None
    try:
        c = Cluster(tmp, env)
        yield c
    finally:
        if c is not None:
            c.stop()
        stop_ray(tmp)
        assert not ray_pids(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def test_job_submission_survives_a_killed_raylet_and_resumes_after_job_stop(cluster, s3_bucket):
    run = f"{s3_bucket}/run"
    common = ["--address", "auto", "--gpus-per-trial", "0", "--cpus-per-trial", "1", "--out", run, "-q"]

    # --- a fixed cluster (nodes of `ray start`, no autoscaler): a trial no node can run fails the job in one line
    t0 = time.monotonic()
    cluster.submit("too-big", "train", *common, "-D", "4", "--epochs", "1", "--cpus-per-trial", "2")
    status, logs = cluster.wait("too-big")
    lines = [ln for ln in logs.splitlines() if ln.strip()]
    assert status == "FAILED" and lines[-1].startswith("densitune: error: --cpus-per-trial 2: no node has, or can be "
                                                       "started with, that much for one trial (largest: node "), logs
    assert lines[-1].endswith(": 1 CPU); ask for less"), lines[-1]  # no node types: nothing else may start
    print(f"too big a trial refused in a submitted job: {time.monotonic() - t0:.0f} s from submission")

    cluster.submit("train", "train", *common, "-D", "4", "8", "--epochs", "2", "--experiment", "n")
    status, logs = cluster.wait("train")
    assert status == "SUCCEEDED", logs[-3000:]

    # --- a search; the raylet of a worker that runs a trial is SIGKILLed
    cluster.submit("search", "search", *common, *GRID, "--experiment", "s")
    deadline = time.monotonic() + 600
    while not cluster.busy("w1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert cluster.busy("w1"), f"no search trial ran on w1 (job {cluster.status('search')})"
    cluster.kill_raylet("w1")
    status, logs = cluster.wait("search")
    assert status == "SUCCEEDED", logs[-3000:]
    points = _points(_rows(run, "s"))
    assert len(points) == POINTS and set(points.values()) == {1}, points

    # --- `ray job stop` mid-search (SIGTERM to the driver), then --resume: each trial once
    cluster.submit("stopped", "search", *common, *GRID, "--experiment", "r")
    deadline = time.monotonic() + 600
    while len(_points(_rows(run, "r"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    p = cluster.job("stop", "--address", cluster.dashboard, "stopped")
    assert p.returncode == 0, p.stderr[-2000:]
    status, logs = cluster.wait("stopped")
    assert status == "STOPPED", logs[-3000:]
    before = len(_points(_rows(run, "r")))
    assert 2 <= before < POINTS, before
    cluster.submit("resumed", "search", *common, *GRID, "--experiment", "r", "--resume")
    status, logs = cluster.wait("resumed")
    assert status == "SUCCEEDED", logs[-3000:]
    points = _points(_rows(run, "r"))
    assert len(points) == POINTS and set(points.values()) == {1}, points
