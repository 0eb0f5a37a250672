"""The autoscaling rehearsal (issue 24, build 4): cluster.yaml's worker types on Ray's fake multi-node provider.

``ray.cluster_utils.AutoscalingCluster`` runs a real autoscaler (Ray's monitor, ``fake_multinode`` provider) that
starts and stops real raylets on this machine. Its worker types are ``cluster.yaml``'s, scaled down to 2 cores:
at most 2 CPUs per node, ``max_workers`` at most 2, an idle timeout of seconds; the GPU type keeps ``{"GPU": 1}``
and ``min_workers: 0``. The head, like cluster.yaml's, offers no GPU (and here no CPU: it runs no trial).
Trials given a fake GPU run on the CPU with the test-only switch ``DENSITUNE_TEST_FAKE_GPU=1``.

* ``train --gpus-per-trial 1`` scales GPU workers up from zero, and the trials run on them;
* idle workers scale down again;
* ``search --gpus-per-trial 0.25`` packs four trials on one GPU node (the autoscaler starts one node for four);
* ``--max-gpu-hours`` stops a run (exit 2, resumable) and ``--resume`` finishes it, each trial once;
* a request no node type can meet is one line, exit 2, before any trial starts or any node is started.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from ray.cluster_utils import AutoscalingCluster
from ray_procs import flag_value, free_ports, marked, node_ports, ray_pids, ray_start, stop_ray

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[2]
IDLE_S = 6  # idle_timeout_minutes, in seconds: workers stop this long after their last trial
NODES = """
import json, sys
from ray._raylet import GcsClient
infos = GcsClient(address=sys.argv[1]).get_all_node_info()
print(json.dumps([{"id": i.node_id.hex(), "alive": i.state == 0, "resources": dict(i.resources_total)}
                  for i in infos.values()]))
"""


def rehearsal_types() -> tuple[dict, dict]:
    """(head resources, worker types) of cluster.yaml, scaled down to fit 2 cores."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    types = dict(config["available_node_types"])
    types.pop(config["head_node_type"])
    workers = {}
    for name, t in types.items():
        resources = dict(t["resources"])
        resources["CPU"] = min(resources.get("CPU", 1), 2)
        workers[name] = {"resources": {**resources, "object_store_memory": 80 * 1024 * 1024}, "node_config": {},
                         "min_workers": t.get("min_workers", 0), "max_workers": min(t.get("max_workers", 2), 2)}
    return {"CPU": 0, "GPU": 0}, workers


class RehearsalCluster(AutoscalingCluster):
    """Ray's AutoscalingCluster with its own temp dir and ports. Its ``start`` runs ``ray stop --force`` (every Ray
    of this machine's user) and its config template is not in the installed wheel, so both are provided here; the
    autoscaler, the provider and the raylets it starts are Ray's."""

    def __init__(self, head_resources: dict, worker_node_types: dict, temp_dir: str, env: dict[str, str]) -> None:
        self.temp_dir, self.env = temp_dir, env
        self.ports = node_ports(free_ports(), head=True, workers=16)
        self.gcs = f"{_node_ip()}:{flag_value(self.ports, 'port')}"
        super().__init__(head_resources, worker_node_types)

    def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **config_kwargs):
        return {
            "cluster_name": "rehearsal", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": IDLE_S / 60,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True, "gcs_address": self.gcs},
            "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [], "rsync_exclude": [],
            "rsync_filter": [], "file_mounts_sync_continuously": False, "initialization_commands": [],
            "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
            "worker_start_ray_commands": [], "head_node_type": "ray.head.default",
            "available_node_types": {**worker_node_types, "ray.head.default": {
                "resources": dict(head_resources), "node_config": {}, "max_workers": 0}},
        }

    def start(self, _system_config=None, override_env=None) -> None:
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        Path(self.config_path).write_text(json.dumps(self._config))
        env = {**self.env, "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_FAKE_CLUSTER": "1", **(override_env or {})}
        head = self._config["available_node_types"]["ray.head.default"]["resources"]
        ray_start(self.temp_dir, "--head", f"--autoscaling-config={self.config_path}", f"--num-cpus={head['CPU']}",
                  f"--num-gpus={head['GPU']}", "--include-dashboard=false", "--object-store-memory=80000000",
                  *self.ports, env=env)

    def shutdown(self) -> None:
        stop_ray(self.temp_dir)

    def nodes(self) -> list[dict]:
        """Every node the cluster ever had (the GCS keeps dead ones): id, alive, resources. Asked from a process of
        the cluster's environment (this process's Ray config was read before the token was set)."""
        p = subprocess.run([sys.executable, "-c", NODES, self.gcs], capture_output=True, text=True, env=self.env,
                           timeout=120)
        assert p.returncode == 0, p.stderr[-2000:]
        return json.loads(p.stdout)

    def gpu_workers(self, *, alive: bool | None = None) -> list[str]:
        return [n["id"] for n in self.nodes() if n["resources"].get("GPU", 0) > 0 and alive in (None, n["alive"])]


def _node_ip() -> str:
    from ray._private.services import get_node_ip_address

    return get_node_ip_address()


@pytest.fixture
def cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
           "DENSITUNE_TEST_FAKE_GPU": "1"}
    tmp = tempfile.mkdtemp(prefix="ra", dir="/tmp")  # Ray's socket paths must stay short
    env = marked(env, tmp)
    head, workers = rehearsal_types()
    c = RehearsalCluster(head, workers, tmp, env)
    try:
        c.start()
        yield c
    finally:
        c.shutdown()
        assert not ray_pids(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _densitune(c: RehearsalCluster, *args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args, "--address", c.gcs, "-q"], capture_output=True,
                          text=True, cwd=cwd, env={**c.env, **(env or {})}, timeout=1200)


def _rows(run: Path, experiment: str) -> list[dict]:
    return [r for f in (run / "results" / f"experiment={experiment}").glob("*.parquet")
            for r in pq.read_table(f).to_pylist()]


def _wait(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(3)
    return check()


def test_cluster_yaml_types_scale_up_pack_scale_down_and_refuse(tmp_path, cluster):
    run = tmp_path / "run"
    gpu_type = [t for t in cluster._config["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu_type and gpu_type[0]["resources"]["GPU"] == 1 and gpu_type[0]["min_workers"] == 0
    assert cluster.gpu_workers() == []  # no GPU until a trial asks for one
    head = [n["id"] for n in cluster.nodes()]

    # --- a request no node type can meet: one line, exit 2, no trial, no node started
    for flags in (["--gpus-per-trial", "2"], ["--gpus-per-trial", "1", "--cpus-per-trial", "3"]):
        t0 = time.monotonic()
        p = _densitune(cluster, "train", "--out", str(run), "-D", "4", "--epochs", "1", *flags, cwd=tmp_path)
        lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-3000:]
        assert "no node has, or can be started with, that much for one trial (largest: type gpu_worker: 2 CPU, 1 GPU; " \
               f"node {_node_ip()}: 0 CPU, 0 GPU; node types from {cluster.config_path}); ask for less" in lines[0], lines
        assert time.monotonic() - t0 < 120 and not _rows(run, "default")
    assert [n["id"] for n in cluster.nodes()] == head

    # --- train --gpus-per-trial 1: GPU workers start from zero and run the trials
    p = _densitune(cluster, "train", "--out", str(run), "-D", "4", "8", "--epochs", "1", "--gpus-per-trial", "1",
                   "--cpus-per-trial", "1", "--experiment", "n", cwd=tmp_path, env={"DENSITUNE_WAIT_NOTICE_S": "0"})
    assert p.returncode == 0, p.stderr[-3000:]
    # while the first GPU node starts, the trials' demand is in the progress line (here: the run's log)
    assert "train: 0 running, 2 waiting for 1 CPU, 1 GPU each" in (run / "densitune.log").read_text()
    started = set(cluster.gpu_workers())
    trained = _rows(run, "n")
    assert len(trained) == 2 and started
    assert {r["node"] for r in trained} <= {f"ray:{n}" for n in started}, ({r["node"] for r in trained}, started)

    # --- idle workers scale down
    assert _wait(lambda: not cluster.gpu_workers(alive=True), IDLE_S + 120), cluster.nodes()

    # --- search --gpus-per-trial 0.25: four trials share one GPU node; one node is started for the four
    p = _densitune(cluster, "search", "--out", str(run), "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5",
                   "--eps-grid", "0", "0.01", "--experiment", "s", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    new = set(cluster.gpu_workers()) - started
    searched = [r for r in _rows(run, "s") if r["split"] == "val"]
    assert len(new) == 1 and len(searched) == 4, (new, len(searched))
    assert {r["node"] for r in searched} == {f"ray:{n}" for n in new}
    assigned = [json.loads(ln)["assigned_gpus"] for f in (run / "tune").glob("search-s/*/result.json")
                for ln in f.read_text().splitlines() if ln.strip()]
    assert assigned == [0.25] * 4, assigned

    # --- --max-gpu-hours stops the run (exit 2, resumable); --resume finishes it, each trial once
    budget = ["--out", str(run), "--gpus-per-trial", "0.25", "--cpus-per-trial", "0.5",
              "--eps-grid", "0", "0.005", "0.01", "0.02", "--experiment", "b", "--max-concurrent", "2"]
    p = _densitune(cluster, "search", *budget, "--max-gpu-hours", "1e-7", cwd=tmp_path)
    assert p.returncode == 2 and "--max-gpu-hours 1e-07 reached" in p.stderr, p.stderr[-3000:]
    assert "--resume" in p.stderr.strip().splitlines()[-1]
    stopped = Counter(r["trial_id"] for r in _rows(run, "b") if r["split"] == "val")
    assert 1 <= len(stopped) < 8, stopped
    p = _densitune(cluster, "search", *budget, "--resume", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    points = Counter((tuple(r["checkpoints"]), r["eps"]) for r in _rows(run, "b") if r["split"] == "val")
    assert len(points) == 8 and set(points.values()) == {1}, points
