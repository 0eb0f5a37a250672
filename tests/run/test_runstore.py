"""The run store on a real S3-compatible server (moto, its own process on loopback): the same readers and
writers as on a local folder, atomic publishing, and the writer lock by conditional create."""

from __future__ import annotations

import json
import os
import socket

import pytest

from densitune.errors import ConfigError
from densitune.results.store import (
    compact_experiment,
    read_results,
    read_spec,
    result_files,
    write_rows,
    write_spec,
)
from densitune.run.runlock import LEASE_S, LockedError, writer_lock
from densitune.run.runstore import ObjectPath, RunStore, files_under, location, publish
from densitune.run.storage import StorageError, check_writable


def _rows(n: int, experiment: str = "e") -> list[dict]:
    from datetime import UTC, datetime

    base = dict(experiment=experiment, stage="search", split="val", score="density", code_version="t",
                started_at=datetime(2026, 1, 1, tzinfo=UTC), node="n", device="cpu", dtype="float32",
                torch_version="t", densitune_version="t", data_checksums="{}")
    return [{**base, "trial_id": f"t{i}", "auroc": i / n, "eps": 0.01 * i} for i in range(n)]


def test_location_names_local_and_bucket_paths(tmp_path):
    assert location(str(tmp_path)) == tmp_path
    assert location(f"file://{tmp_path}") == tmp_path
    p = location("s3://bucket/runs//a/")
    assert isinstance(p, ObjectPath) and str(p) == "s3://bucket/runs/a" and p.bucket == "bucket"
    assert str(p / "results" / "x.parquet") == "s3://bucket/runs/a/results/x.parquet"
    assert (p / "x.parquet").suffix == ".parquet" and (p / "x.parquet").parent == p
    with pytest.raises(ConfigError, match="unsupported storage scheme 'ftp'"):
        location("ftp://host/run")
    with pytest.raises(ConfigError, match="name a bucket"):
        location("s3://")


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.process)])
def test_rows_spec_and_compaction_round_trip(where, tmp_path, request):
    root = str(tmp_path / "run") if where == "local" else request.getfixturevalue("s3_bucket") + "/run"
    results = RunStore(root).results
    for i in range(3):
        write_rows(results, _rows(4)[i:i + 2], name=f"p{i}")
    write_spec(results, "e", {"metric": "auroc", "eps": [0, 0.01]})
    assert read_spec(results, "e") == {"metric": "auroc", "eps": [0, 0.01]}
    before = read_results(str(results)).sort_by("trial_id")
    assert before.num_rows == 6 and len(result_files(results, "e")) == 3
    assert compact_experiment(results, "e") == (3, 6)
    after = read_results(str(results)).sort_by("trial_id")
    assert after.equals(before)
    assert len(result_files(results, "e")) == 1
    names = [f.name for f in files_under(results)]
    assert not [n for n in names if n.startswith((".tmp", "_compact"))]


@pytest.mark.process
def test_a_published_object_is_whole_or_absent(s3_bucket):
    p = location(f"{s3_bucket}/run/x.bin")
    assert not p.exists()

    def failing(f):
        f.write(b"half")
        raise RuntimeError("killed while writing")

    with pytest.raises(RuntimeError):
        publish(p, failing)
    assert not p.exists()  # nothing was PUT
    publish(p, b"whole")
    assert p.read_bytes() == b"whole" and p.is_file() and p.parent.is_dir()


@pytest.mark.process
def test_writer_lock_on_the_bucket_admits_one_writer(s3_bucket, s3_server):
    run = f"{s3_bucket}/run"
    bucket = s3_bucket.removeprefix("s3://")
    with writer_lock(run, "search", "e") as held:
        info = json.loads(location(str(held)).read_text())
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=f"is being written by pid {os.getpid()} on {socket.gethostname()}"):
            with writer_lock(run, "search", "e"):
                pass
        with writer_lock(run, "search", "other"):  # another experiment is another lock
            pass
    assert "run/locks/e.json" not in s3_server.objects(bucket)  # released


@pytest.mark.process
def test_lock_of_a_dead_holder_or_an_expired_lease_is_taken_over(s3_bucket, s3_server, monkeypatch):
    import subprocess
    import sys

    run = f"{s3_bucket}/run"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout
    lock = location(f"{run}/locks/e.json")
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "command": "search"}))
    with writer_lock(run, "search", "e"):  # same host, pid gone
        pass
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "search"}))
    with pytest.raises(LockedError, match="on elsewhere"):  # another host, lease fresh
        with writer_lock(run, "search", "e"):
            pass
    import densitune.run.runlock as runlock

    monkeypatch.setattr(runlock, "LEASE_S", -1.0)  # the store's clock says the lease ran out
    with writer_lock(run, "search", "e"):
        pass
    assert LEASE_S > 0


@pytest.mark.process
def test_check_writable_names_a_missing_bucket_without_credentials(s3_server, s3_bucket):
    check_writable(f"{s3_bucket}/run")
    with pytest.raises(StorageError) as e:
        check_writable("s3://no-such-bucket-densitune/run")
    assert "no-such-bucket-densitune" in str(e.value) and "secret" not in str(e.value).lower()
    assert s3_server.env["AWS_SECRET_ACCESS_KEY"] not in str(e.value)


@pytest.mark.process
def test_node_local_files_of_a_bucket_run_stay_in_the_temp_folder(s3_bucket, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    store = RunStore(f"{s3_bucket}/runs/a")
    assert store.remote and store.tune == f"{s3_bucket}/runs/a/tune"
    assert store.cache.is_relative_to(tmp_path) and store.log_file.is_relative_to(tmp_path)
