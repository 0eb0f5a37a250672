"""Searches into a bucket that stalls, slows or is shared (issue 28), on real moto S3 servers on loopback (each its
own process) and real searches in their own processes: a server paused for good ends the run by itself, in one
line; every response delayed 3-4 s through a loopback proxy still completes each point once; a writer paused past
a short lease while another host (``unshare -u``) takes over exits non-zero without writing again, and the study
holds one trial per point; two experiments searched at once from two staging folders keep both studies whole
(slow: real Ray runs)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import start_moto, stop_moto

pytestmark = [pytest.mark.slow, pytest.mark.process]

#: A grid of one model group (D = 8, two seeds) x one density x these ε: one trial per ε.
EPS = ("0", "0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1")


def _search(models: Path, run: str, experiment: str, eps: tuple[str, ...], *extra: str) -> list[str]:
    return [sys.executable, "-m", "densitune", "search", "--out", run, "--models", str(models / "t"), "-D", "8",
            "--experiment", experiment, "--score", "density", "--density", "gmm_sum", "--eps-grid", *eps,
            "--eval-limit", "60", "--num-cpus", "1", "-q", *extra]


def _machine(env: dict[str, str]) -> dict[str, str]:
    """The environment of one machine: its own temporary folder (the bucket run's staging) and Ray folder."""
    tmp = tempfile.mkdtemp(prefix="bf", dir="/tmp")  # short: Ray's socket paths live under it
    return {**env, "TMPDIR": tmp, "RAY_TMPDIR": tmp}


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def _rows(run: str, experiment: str) -> list[dict]:
    from densitune.results.store import read_results

    return read_results(run + "/results", experiment=experiment, stage="search").to_pylist()


def _study(run: str, experiment: str):
    import optuna

    from densitune.search.optuna_study import journal_path, open_storage

    return optuna.load_study(study_name=experiment, storage=open_storage(journal_path(run + "/results", experiment)))


def _wait(what, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} first: {proc.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def _object(client, bucket: str, key: str) -> bytes:
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return b""


def _row_files(client, bucket: str, experiment: str) -> int:
    found = client.list_objects_v2(Bucket=bucket, Prefix=f"run/results/experiment={experiment}/")
    return sum(1 for o in found.get("Contents", []) if o["Key"].endswith(".parquet"))


def test_a_writer_paused_past_its_lease_stops_without_writing_again(tmp_path, s3_bucket, s3_server, trained_models):
    env = _machine({**os.environ, **s3_server.env, "DENSITUNE_LOCK_LEASE_S": "20"})
    run, bucket, client = f"{s3_bucket}/run", s3_bucket.removeprefix("s3://"), s3_server.client()
    first = subprocess.Popen(_search(trained_models, run, "f", EPS, "--max-concurrent", "1"), env=env, cwd=tmp_path,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait(lambda: _row_files(client, bucket, "f") >= 1, 600, first)
        first.send_signal(signal.SIGSTOP)  # a long GC pause, a frozen VM: its lease runs out
        time.sleep(25)
        other = _machine({**os.environ, **s3_server.env, "DENSITUNE_LOCK_LEASE_S": "20"})
        second = subprocess.Popen(["unshare", "-u", "sh", "-c", 'hostname other-host && exec "$@"', "sh",
                                   *_search(trained_models, run, "f", EPS, "--resume")],
                                  env=other, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait(lambda: b"other-host" in _object(client, bucket, "run/locks/f.json"), 300, second)
        first.send_signal(signal.SIGCONT)  # it wakes while the other host holds the lock
        t0 = time.monotonic()
        _, err1 = first.communicate(timeout=300)
        stopped_in = time.monotonic() - t0
        _, err2 = second.communicate(timeout=900)
    finally:
        for p in (first, locals().get("second")):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
    assert second.returncode == 0, err2[-3000:]
    assert first.returncode not in (0, None), err1[-3000:]
    lines = _lines(err1)
    assert len(lines) == 1 and "lost the writer lock" in lines[0], err1[-3000:]
    assert stopped_in < 60, stopped_in
    print(f"the paused writer stopped {stopped_in:.0f} s after it was continued: {lines[0]}")
    rows = _rows(run, "f")
    points = Counter(eps for _, eps in {(r["trial_id"], r["eps"]) for r in rows})  # trials per point
    assert sorted(points) == sorted(float(e) for e in EPS) and set(points.values()) == {1}  # each point once
    study = _study(run, "f")
    trials = study.get_trials()
    assert len(trials) == len(EPS)  # exactly one trial per point
    assert {t.user_attrs["trial_id"] for t in trials} == {r["trial_id"] for r in rows}  # the rows are the study's


def test_two_experiments_at_once_from_two_machines_keep_both_studies(tmp_path, s3_bucket, s3_server, trained_models):
    run = f"{s3_bucket}/run"
    grids = {"a": EPS[:3], "b": EPS[3:8]}
    procs = {name: subprocess.Popen(_search(trained_models, run, name, eps), env=_machine({**os.environ, **s3_server.env}),
                                    cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, eps in grids.items()}
    for name, p in procs.items():
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, (name, err[-3000:])
    for name, eps in grids.items():
        trials = _study(run, name).get_trials()
        assert len(trials) == len(eps)
        assert sorted(t.params["eps"] for t in trials) == sorted(float(e) for e in eps)
        assert {t.user_attrs["trial_id"] for t in trials} == {r["trial_id"] for r in _rows(run, name)}


def test_a_server_paused_for_good_ends_the_search_by_itself(tmp_path, trained_models):
    server = start_moto()
    try:
        server.client().create_bucket(Bucket="paused")
        env = _machine({**os.environ, **server.env, "DENSITUNE_LOCK_LEASE_S": "20"})
        search = subprocess.Popen(_search(trained_models, "s3://paused/run", "p", EPS, "--max-concurrent", "1",
                                          "--storage-timeout", "3"),
                                  env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _wait(lambda: _row_files(server.client(), "paused", "p") >= 1, 600, search)
        os.kill(server.proc.pid, signal.SIGSTOP)  # paused for good
        t0 = time.monotonic()
        _, err = search.communicate(timeout=600)
        took = time.monotonic() - t0
    finally:
        if search.poll() is None:
            search.kill()
        stop_moto(server)
    assert search.returncode not in (0, None), err[-3000:]
    lines = _lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert server.endpoint in lines[0] or "writer lock" in lines[0], lines[0]
    assert took < 20 + 4 * 3 * 2 + 60, took  # the lease, a stalled call's attempts, Ray's shutdown
    print(f"the paused server's search stopped {took:.0f} s after the pause: {lines[0]}")


class _SlowProxy:
    """A TCP proxy on loopback that holds back every response of the server by 3-4 s (a slow endpoint)."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream = (host, int(port))
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def responses() -> None:
            last = 0.0
            while data := await up_reader.read(65536):
                if time.monotonic() - last > 0.5:  # the start of a response: hold it back
                    await asyncio.sleep(random.uniform(3.0, 4.0))
                last = time.monotonic()
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(requests(), responses())
        except (ConnectionError, OSError):
            writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)


def test_every_response_delayed_3_to_4_s_the_search_completes_each_point_once(tmp_path, s3_bucket, s3_server,
                                                                             trained_models):
    proxy = _SlowProxy(s3_server.endpoint)
    try:
        env = _machine({**os.environ, **s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{proxy.port}"})
        run = f"{s3_bucket}/run"
        t0 = time.monotonic()
        p = subprocess.run(_search(trained_models, run, "slow", EPS[:2]), env=env, cwd=tmp_path, capture_output=True,
                           text=True, timeout=1500)
        took = time.monotonic() - t0
    finally:
        proxy.close()
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _rows(run, "slow")
    points = Counter(eps for _, eps in {(r["trial_id"], r["eps"]) for r in rows})  # trials per point
    assert sorted(points) == [0.0, 0.001] and set(points.values()) == {1}
    assert len(_study(run, "slow").get_trials()) == 2
    print(f"search of 2 points through the slow proxy: {took:.0f} s")
    shutil.rmtree(env["TMPDIR"], ignore_errors=True)
