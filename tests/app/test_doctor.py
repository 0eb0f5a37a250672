"""``densitune doctor`` on a 3-node cluster on this machine (``ray.cluster_utils``): the table of every node; exit 2
with one line naming the node when a node runs another densitune install (a real node started with a PYTHONPATH
overlay that provides another densitune) or when ``--out`` cannot be written; and the train service runs the same
check at its start with ``--address`` (``--no-doctor`` skips it)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.process]

OTHER = "0.0.1+other"


def _densitune(*args: str, cwd: Path, tmp: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "RAY_TMPDIR": tmp})


def _errors(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.startswith("densitune: error: ")]


@pytest.fixture
def cluster(tmp_path):
    """A head without CPUs, a worker, and a worker whose Python finds another densitune install first (PYTHONPATH):
    a package and its distribution metadata, laid out as ``pip install --target overlay`` leaves them."""
    from ray.cluster_utils import Cluster

    overlay = tmp_path / "overlay"
    (overlay / "densitune").mkdir(parents=True)
    (overlay / "densitune" / "__init__.py").write_text(f'__version__ = "{OTHER}"\n')
    (overlay / f"densitune-{OTHER}.dist-info").mkdir()
    (overlay / f"densitune-{OTHER}.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: densitune\nVersion: {OTHER}\n")
    with tempfile.TemporaryDirectory(prefix="rd", dir="/tmp") as tmp:
        c = Cluster(initialize_head=True, connect=False,
                    head_node_args={"num_cpus": 0, "include_dashboard": False, "temp_dir": tmp,
                                    "object_store_memory": 80 * 1024 * 1024})
        try:
            good = c.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024)
            other = c.add_node(num_cpus=1, object_store_memory=80 * 1024 * 1024,
                               env_vars={"PYTHONPATH": f"{overlay}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
            c.wait_for_nodes()
            yield c, good, other, overlay, tmp
        finally:
            c.shutdown()


def test_doctor_prints_the_table_and_names_the_node_with_another_install(tmp_path, cluster):
    import densitune

    c, good, other, overlay, tmp = cluster
    run = tmp_path / "run"
    p = _densitune("doctor", "--address", c.address, "--out", str(run), cwd=tmp_path, tmp=tmp)
    assert p.returncode == 2, p.stderr[-3000:]
    table = p.stdout.strip().splitlines()
    assert table[0].split() == ["node", "GPUs", "python", "torch", "ray", "densitune", "CUDA", "--out", "--data-root",
                                "free", "GB"]
    assert table[1].startswith("driver") and len(table) == 5  # the driver + head + 2 workers
    assert sum(OTHER in row for row in table) == 1 and f"({other.node_id[:8]})" in next(r for r in table if OTHER in r)
    assert all(row.split()[8] == "ok" for row in table[2:])  # --out takes a probe file on every node
    (line,) = _errors(p)  # one problem: the overlay node, named
    assert line == (f"densitune: error: node {other.node_ip_address} ({other.node_id[:8]}): densitune {OTHER} at "
                    f"{overlay / 'densitune'}, but the driver runs {densitune.__version__} at "
                    f"{Path(densitune.__file__).parent}")
    assert not run.exists() and not list(tmp_path.glob(".densitune-doctor-*"))  # the probes were removed

    # without that node: no problem, exit 0
    c.remove_node(other)
    ok = _densitune("doctor", "--address", c.address, "--out", str(run), cwd=tmp_path, tmp=tmp)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert len(ok.stdout.strip().splitlines()) == 4 and not _errors(ok)

    # --out where no node can write (under a regular file): one line per node, each naming it, exit 2
    (tmp_path / "afile").write_text("not a folder\n")
    bad = _densitune("doctor", "--address", c.address, "--out", str(tmp_path / "afile" / "run"), cwd=tmp_path, tmp=tmp)
    assert bad.returncode == 2
    errors = _errors(bad)
    ids = sorted(ln.split("(", 1)[1][:8] for ln in errors)
    assert ids == sorted([c.head_node.node_id[:8], good.node_id[:8]])
    assert all(f"--out {tmp_path / 'afile' / 'run'} is not writable there: {tmp_path / 'afile'} is not a folder" in ln
               for ln in errors)

    # a data root no node can read, and less free disk than asked for: two lines per node
    short = _densitune("doctor", "--address", c.address, "--data-root", str(tmp_path / "no-data"), "--min-free-gb",
                       "1e9", cwd=tmp_path, tmp=tmp)
    assert short.returncode == 2
    errors = _errors(short)
    assert len(errors) == 4
    assert sum(f"--data-root {tmp_path / 'no-data'} is not readable there: does not exist" in ln for ln in errors) == 2
    assert sum("GB free in" in ln and "(less than 1e+09 GB)" in ln for ln in errors) == 2
    assert [row.split()[9] for row in short.stdout.strip().splitlines()[2:]] == ["FAIL", "FAIL"]  # --data-root


def test_train_runs_the_doctor_at_its_start_on_a_cluster(tmp_path, cluster):
    c, good, other, overlay, tmp = cluster
    run = tmp_path / "run"
    p = _densitune("train", "--address", c.address, "--gpus-per-trial", "0", "--out", str(run), "-D", "4",
                   "--epochs", "1", cwd=tmp_path, tmp=tmp)
    assert p.returncode == 2, p.stderr[-3000:]
    (line,) = _errors(p)
    assert f"({other.node_id[:8]}): densitune {OTHER} at {overlay / 'densitune'}" in line
    assert "densitune doctor (--no-doctor skips it)" in p.stdout
    assert not list(run.rglob("*.parquet"))  # before any trial started
