"""No secret on the nodes (issue 24, Build 6): with static AWS credentials in the driver's environment, a train and
a search into a bucket on a 3-node Ray cluster on this machine leave the secret in no file of any node's Ray session
folder, no object of the bucket, no log, no console output and no ``ray list actors --detail`` / ``ray list jobs``
output. The nodes inherit the environment (as a node with its own credentials would have them), so the trials still
write the bucket: credentials reach them from the node, never in a runtime env. The doctor runs at both starts and
leaves none of its probe objects behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.process]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_holding(folder: Path, needle: bytes) -> list[str]:
    hits = []
    for p in folder.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:  # a socket, or a file removed meanwhile
            continue
    return hits


def test_credentials_never_reach_a_runtime_env_a_log_or_an_object(s3_server, tmp_path, monkeypatch):
    import boto3
    from ray.cluster_utils import Cluster

    from densitune.results.store import read_results
    from densitune.run import runstore

    secret = f"densitune-leak-{uuid.uuid4().hex}"
    token = f"densitune-token-{uuid.uuid4().hex}"
    env = {**s3_server.env, "AWS_SECRET_ACCESS_KEY": secret, "AWS_SESSION_TOKEN": token}
    for k, v in env.items():  # before the cluster starts: its nodes inherit them, as a node with its own keys would
        monkeypatch.setenv(k, v)
    runstore._filesystem.cache_clear()
    bucket = f"densitune-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server.endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    run = f"s3://{bucket}/run"
    scratch = tmp_path / "tmp"  # the driver's temp dir: the bucket run's node-local folder (log, cache) lands here
    scratch.mkdir()
    dashboard = _free_port()

    with tempfile.TemporaryDirectory(prefix="rs", dir="/tmp") as ray_tmp:
        cluster = Cluster(initialize_head=True, connect=False,
                          head_node_args={"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard,
                                          "temp_dir": ray_tmp, "object_store_memory": 100 * 1024 * 1024})
        try:
            for _ in range(2):
                cluster.add_node(num_cpus=1, object_store_memory=100 * 1024 * 1024)
            cluster.wait_for_nodes()
            cli_env = {**os.environ, "RAY_TMPDIR": ray_tmp, "TMPDIR": str(scratch)}
            common = ["--address", cluster.address, "--gpus-per-trial", "0", "--out", run]  # the doctor too: a probe object
            outputs = []
            for args in (["train", "-D", "4", "--epochs", "1", "--experiment", "t"],
                         ["search", "--experiment", "s", "--score", "density", "--density", "gmm_sum",
                          "--eps-grid", "0", "0.01", "--eval-limit", "100"]):
                p = subprocess.run([sys.executable, "-m", "densitune", *args, *common], cwd=tmp_path, env=cli_env,
                                   capture_output=True, text=True, timeout=900)
                assert p.returncode == 0, p.stderr[-3000:]
                outputs += [p.stdout, p.stderr]
            state = [subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "list", what, "--detail",
                                     "--address", f"http://127.0.0.1:{dashboard}"], env=cli_env, capture_output=True,
                                    text=True, timeout=300) for what in ("actors", "jobs")]
            for p in state:
                assert p.returncode == 0, p.stderr[-2000:]
            outputs += [p.stdout + p.stderr for p in state]
            # the state API listed the trial actors (whose runtime env carried the secret before the fix)
            assert "ImplicitFunc" in state[0].stdout, state[0].stdout[-2000:]

            stages = {r["stage"] for r in read_results(f"{run}/results").to_pylist()}
            assert stages == {"train", "search"}  # the nodes wrote the bucket with credentials of their own
            objects = s3_server.objects(bucket)
            assert objects and not [k for k in objects if ".densitune-doctor-" in k]  # each node's probe removed
            assert all("densitune doctor" in o for o in outputs[0:4:2])  # it ran at the start of train and search
            for needle in (secret, token):
                assert not [k for k, body in objects.items() if needle.encode() in body]
                assert not [o for o in outputs if needle in o]
                assert not _files_holding(Path(ray_tmp), needle.encode())  # every node's session folder and logs
                assert not _files_holding(scratch, needle.encode())  # the run's own log and cache
                assert not _files_holding(tmp_path, needle.encode())
        finally:
            cluster.shutdown()
            runstore._filesystem.cache_clear()
