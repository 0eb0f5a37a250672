"""Resources are requested, not guessed: GPUs per trial on a cluster, fractional GPUs for search trials,
and a Ray already running on the machine neither breaks nor captures a local run."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_procs import ray_pids, stop_ray

from densitune.errors import ConfigError
from densitune.run.ray_runtime import FAKE_GPU_ENV
from densitune.run.resource_flags import check_resource_flags


def densitune(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=timeout)


@pytest.mark.parametrize(("flags", "fragment"), [
    (["--address", "auto"], "with --address (a cluster) pass --gpus-per-trial explicitly"),
    (["--gpus-per-trial", "1.5"], "--gpus-per-trial must be 0, a fraction in (0, 1] or a whole number of GPUs, got 1.5"),
    (["--gpus-per-trial", "-1"], "--gpus-per-trial must be 0, a fraction in (0, 1] or a whole number of GPUs"),
    (["--cpus-per-trial", "0"], "--cpus-per-trial must be > 0, got 0.0"),
    (["--num-cpus", "0"], "--num-cpus must be > 0, got 0"),
    (["--max-gpu-hours", "0"], "--max-gpu-hours must be > 0"),
])
def test_resource_flags_are_one_line_errors_before_ray(tmp_path, flags, fragment, capsys):
    from densitune.cli import main

    for command in ("train", "search"):
        assert main([command, "--out", str(tmp_path / "run"), "-q", *flags]) == 2
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
        assert len(lines) == 1 and fragment in lines[0], lines
        assert not (tmp_path / "run").exists()


def test_gpu_fractions_and_wholes_are_accepted():
    from argparse import Namespace

    for g in (0, 0.25, 0.5, 1, 2, 8):
        check_resource_flags(Namespace(address="auto", gpus_per_trial=g))
    check_resource_flags(Namespace(address=None, gpus_per_trial=None))  # locally the machine decides
    with pytest.raises(ConfigError):
        check_resource_flags(Namespace(address="auto", gpus_per_trial=None))


@pytest.fixture
def short_tmp():
    with tempfile.TemporaryDirectory(prefix="rt", dir="/tmp") as d:  # Ray's socket paths must stay short
        yield d


@pytest.mark.ray
@pytest.mark.process
def test_search_trials_request_a_quarter_gpu_on_a_gpu_node(tmp_path, trained_models, short_tmp, monkeypatch):
    """A cluster whose node declares a GPU: each search trial holds 0.25 of it, so four share it."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv(FAKE_GPU_ENV, "1")  # test-only: the node's fake GPU runs on the CPU (its trials inherit it)

    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 4, "num_gpus": 1, "include_dashboard": False,
                                      "object_store_memory": 150 * 1024 * 1024, "temp_dir": short_tmp})
    try:
        models = trained_models / "t"
        p = densitune("search", "--address", cluster.address, "--gpus-per-trial", "0.25", "--cpus-per-trial", "1",
                      "--out", str(tmp_path / "run"), "--models", str(models), "-D", "8", "--eps-grid", "0", "0.01",
                      cwd=tmp_path, env={"RAY_TMPDIR": short_tmp})
        assert p.returncode == 0, p.stderr[-3000:]
        # Tune's own record of each trial: the resources it was scheduled with and what Ray assigned.
        results = [json.loads(ln) for f in (tmp_path / "run" / "tune").rglob("result.json")
                   for ln in f.read_text().splitlines() if ln.strip()]
        assert len(results) == 2 and all(r["assigned_gpus"] == 0.25 for r in results)
        with pytest.raises(subprocess.CalledProcessError):  # more than the node can have: one line, before trials
            q = densitune("search", "--address", cluster.address, "--gpus-per-trial", "2", "--out", str(tmp_path / "r2"),
                          "--models", str(models), cwd=tmp_path, env={"RAY_TMPDIR": short_tmp})
            q.check_returncode()
        last = q.stderr.strip().splitlines()[-1]
        assert last.startswith("densitune: error: --cpus-per-trial 1 --gpus-per-trial 2: no node has, or can be started "
                               "with, that much for one trial (largest: node "), last
        assert last.endswith(": 4 CPU, 1 GPU); ask for less"), last  # a fixed cluster: no node types
        assert not list((tmp_path / "r2").rglob("*.parquet"))
    finally:
        cluster.shutdown()


@pytest.mark.ray
@pytest.mark.process
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_a_trial_given_a_fake_gpu_without_the_switch_fails_in_one_line(tmp_path, short_tmp, monkeypatch):
    """A node that offers a GPU torch cannot use (here: a declared one): the trial fails in one line naming the
    node, the run exits 2 and nothing trains on the CPU; never a silent CPU fallback."""
    from ray.cluster_utils import Cluster

    monkeypatch.delenv(FAKE_GPU_ENV, raising=False)
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 2, "num_gpus": 1, "include_dashboard": False,
                                      "object_store_memory": 150 * 1024 * 1024, "temp_dir": short_tmp})
    try:
        # --no-doctor: the trial's own check (what covers node types an autoscaler has not started yet)
        p = densitune("train", "--address", cluster.address, "--gpus-per-trial", "1", "--out", str(tmp_path / "run"),
                      "-D", "4", "--epochs", "1", "--no-doctor", cwd=tmp_path, env={"RAY_TMPDIR": short_tmp})
        assert p.returncode == 2, p.stderr[-3000:]
        assert "densitune doctor" not in p.stdout
        last = p.stderr.strip().splitlines()[-1]
        assert re.search(r"\(cnn-D4-ce-s0-\w+, not retried\): node [\d.]+: given 1 GPU\(s\) but torch sees no CUDA "
                         r"device \(no GPU, or a driver too old for CUDA [\w.]+\); not run on its CPU; ", last), last
        assert "Traceback" not in p.stderr
        assert not list((tmp_path / "run" / "results").rglob("*.parquet"))  # not one epoch trained on the CPU
        # the doctor (on by default with --address) says the same before any trial starts
        q = densitune("doctor", "--address", cluster.address, cwd=tmp_path, env={"RAY_TMPDIR": short_tmp})
        assert q.returncode == 2 and re.fullmatch(r"densitune: error: node [\d.]+ \(\w{8}\): offers 1 GPU\(s\) but torch "
                                                  r"sees no CUDA device \(no GPU, or a driver too old for the pinned "
                                                  r"torch\)", q.stderr.strip().splitlines()[-1]), q.stderr[-2000:]
    finally:
        cluster.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
@pytest.mark.process
def test_a_running_ray_is_joined_only_with_address_auto(tmp_path, short_tmp, no_other_ray):
    """`ray start --head` on the machine: without --address densitune starts its own Ray; --address auto joins."""
    env = {"RAY_TMPDIR": short_tmp}
    start = subprocess.run(
        [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={_free_port()}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={short_tmp}", '--resources={"probe_head": 1}'],
        capture_output=True, text=True, env={**os.environ, **env}, timeout=120)
    try:
        assert start.returncode == 0, start.stderr[-2000:]
        assert ray_pids(short_tmp)
        common = ["train", "--out", str(tmp_path / "run"), "-D", "4", "--epochs", "1", "--num-cpus", "2"]
        alone = densitune(*common, "--experiment", "alone", "--verbose", cwd=tmp_path, env=env)
        assert alone.returncode == 0, alone.stderr[-3000:]
        assert "started a local Ray" in alone.stderr and "probe_head" not in alone.stderr
        joined = densitune(*common[:-2], "--address", "auto", "--gpus-per-trial", "0", "--experiment", "joined",
                           "--verbose", cwd=tmp_path, env=env)
        assert joined.returncode == 0, joined.stderr[-3000:]
        assert re.search(r"joined the Ray cluster at auto: 1 node\(s\), resources \{.*'probe_head': 1\.0", joined.stderr)
        rows = [r for f in (tmp_path / "run" / "results").rglob("*.parquet") for r in pq.read_table(f).to_pylist()]
        assert sorted(r["experiment"] for r in rows) == ["alone", "joined"]
    finally:
        stop_ray(short_tmp)
    assert not ray_pids(short_tmp)
