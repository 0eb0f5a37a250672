"""Shared fixtures: a real local Ray, and small models trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densitune.trainables.train.checkpoint import save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit

# Small networks on 2 cores run several times faster on one intra-op thread
# (measured: first CNN epoch 1.8 s with 1 thread vs 10 s with 2).
torch.set_num_threads(1)

#: Small but real: the CNN on the embedded digits, a few epochs.
TINY = dict(backbone="cnn", feature_dim=8, epochs=3, batch_size=64, lr=0.05, dataset="digits")


def claim_while_held(lock_path: Path, claim) -> tuple[bool, list[int]]:
    """Run ``claim()`` (a claim pass) in a thread while this test holds the disk-cache entry lock ``lock_path``
    (as another process computing that entry would); returns (whether the claim was still waiting on the held
    entry after 120 s, [its result] once it returned)."""
    import fcntl
    import threading

    lock_path.parent.mkdir(parents=True, exist_ok=True)
    out: list[int] = []
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        claimer = threading.Thread(target=lambda: out.append(claim()))
        claimer.start()
        claimer.join(timeout=120)
        waited = claimer.is_alive()  # still inside: it waits for the held entry instead of skipping it
        fcntl.flock(lock, fcntl.LOCK_UN)
    claimer.join()
    return waited, out


def train_to(models_dir: Path, experiment: str, **overrides) -> Path:
    """Train one config with the pure loop (no Ray) and store it like the trainable does."""
    cfg = TrainConfig(**{**TINY, "experiment": experiment, **overrides})
    *_, last = fit(cfg)
    d = models_dir / experiment / cfg.key
    save_checkpoint(d, config=cfg, model=last.model, loss=last.loss, data=last.data, epoch=last.epoch, metrics=last.metrics)
    return d


@pytest.fixture(scope="session")
def trained_models(tmp_path_factory) -> Path:
    """A models directory with cnn D=8 (seeds 0 and 1) and cnn D=4 (seed 0)."""
    root = tmp_path_factory.mktemp("models")
    train_to(root, "t", seed=0)
    train_to(root, "t", seed=1)
    train_to(root, "t", seed=0, feature_dim=4)
    return root


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray (2 CPUs, no dashboard), started once for the session."""
    import ray

    _start_session_ray()
    yield ray
    ray.shutdown()


def _start_session_ray() -> None:
    import ray

    # address="local": always a fresh instance of our own, never a Ray some other process started on the machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)


@pytest.fixture
def no_other_ray():
    """No Ray of this test process runs during the test (``--address auto`` could find it): the session's Ray,
    if started, is stopped for the test and started again after it."""
    import ray

    running = ray.is_initialized()
    if running:
        ray.shutdown()
    yield
    if running:
        _start_session_ray()


# ------------------------------------------------------------------------------------------ an S3 server on loopback

#: Credentials of the test server: they must never appear in a run's rows, logs or specs (tests check).
S3_SECRET = "densitune-test-secret-0123456789"


class S3Server:
    """moto's standalone S3 server (pinned in the test extra), as its own process on 127.0.0.1."""

    def __init__(self, proc, endpoint: str) -> None:
        self.proc, self.endpoint = proc, endpoint
        self.env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "densitune-test", "AWS_SECRET_ACCESS_KEY": S3_SECRET,
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                            aws_secret_access_key=S3_SECRET, region_name="us-east-1")

    def objects(self, bucket: str) -> dict[str, bytes]:
        """Every object in ``bucket``: key -> content."""
        c = self.client()
        keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])]
        return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="session")
def s3_server():
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=2)  # noqa: S310 - loopback
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    yield S3Server(proc, endpoint)
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server, monkeypatch):
    """A fresh bucket on the loopback server, with this process's environment pointed at it: ``s3://<name>``."""
    import uuid

    from densitune.run import runstore

    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    runstore._filesystem.cache_clear()
    name = f"densitune-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield f"s3://{name}"
    runstore._filesystem.cache_clear()
