"""Shared fixtures: a real local Ray, and small models trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from densitune.trainables.train.checkpoint import save_checkpoint
from densitune.trainables.train.config import TrainConfig
from densitune.trainables.train.loop import fit

pytest_plugins = ["pytester"]  # tests/layout/test_marker_guard.py runs the guard in a pytest of its own

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


def start_moto(env: dict[str, str] | None = None) -> S3Server:
    """moto's S3 server as a process of its own on a free loopback port, once it answers (``env``: extra variables,
    e.g. ``INITIAL_NO_AUTH_ACTION_COUNT`` to turn its IAM checks on)."""
    import os
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})})
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
    return S3Server(proc, endpoint)


def stop_moto(server: S3Server) -> None:
    """Stop a server of :func:`start_moto` (continued first, in case a test paused it with SIGSTOP)."""
    import signal

    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
        server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def s3_server():
    server = start_moto()
    yield server
    stop_moto(server)


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


# ------------------------------------------------------------------------------------- the marker guard: ray, process
#
# A test that starts Ray (``ray.init``, a ``ray.cluster_utils.Cluster``, anything reaching
# ``ray._private.worker.init``, or a fixture that did) or uses one this process already runs (``ray.get``, ``.remote()``,
# Tune: anything that checks the worker is connected) must be marked ``ray``; a test that starts another process
# (``subprocess``, ``os.posix_spawn``, ``multiprocessing``, ``os.fork``, or a fixture that did, e.g.
# ``s3_server``) must be marked ``process``. Processes Ray starts for itself count as ``ray``. The guard fails a
# test that lacks its marker, naming the marker to add. With ``DENSITUNE_TEST_GUARD=record:FILE`` it fails nothing
# and writes, for each test that started something, the markers it needs (JSON ``{nodeid: [marker, ...]}``).

GUARD_ENV = "DENSITUNE_TEST_GUARD"


def _ray_dir() -> str | None:
    """The directory of the installed ``ray`` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("ray")
    return None if spec is None or not spec.submodule_search_locations else list(spec.submodule_search_locations)[0]


class _Guard:
    """What the running test (and the fixture being set up) started; one instance per pytest session."""

    def __init__(self, record: str | None) -> None:
        import os

        self.record = record
        self.item: pytest.Item | None = None
        self.fixtures: list[str] = []  # the fixtures being set up, innermost last
        self.fixture_needs: dict[str, set[str]] = {}  # fixture name -> markers a test that uses it needs
        self.needs: dict[str, set[str]] = {}  # nodeid -> markers it needs (recorded)
        self.violations: list[str] = []  # of the current test phase
        ray_dir = _ray_dir()
        self.ray_prefix = None if ray_dir is None else os.path.join(ray_dir, "")

    def kind(self, frame) -> str:
        """``ray`` when Ray's own code is on the stack (Ray starting its processes), else ``process``."""
        while frame is not None and self.ray_prefix is not None:
            if frame.f_code.co_filename.startswith(self.ray_prefix):
                return "ray"
            frame = frame.f_back
        return "process"

    def event(self, kind: str, what: str) -> None:
        """The current test started ``what`` (a ``kind``: ray / process): record it; fail the test (raise) when it
        lacks the marker, unless recording."""
        item = self.item
        if item is None:  # collection, session teardown: not a test's doing
            return
        for name in self.fixtures:
            self.fixture_needs.setdefault(name, set()).add(kind)
        self.need(item, kind, what)
        if not self.record and item.get_closest_marker(kind) is None:
            raise _MarkerMissing(self.message(item, kind, what))

    def need(self, item: pytest.Item, kind: str, what: str) -> None:
        self.needs.setdefault(item.nodeid, set()).add(kind)
        if not self.record and item.get_closest_marker(kind) is None:
            msg = self.message(item, kind, what)
            if msg not in self.violations:
                self.violations.append(msg)

    @staticmethod
    def message(item: pytest.Item, kind: str, what: str) -> str:
        started = "starts Ray" if kind == "ray" else "starts a process"
        return (f"{item.nodeid} {started} ({what}) but is not marked `{kind}`: add @pytest.mark.{kind} "
                f"(or `pytestmark = pytest.mark.{kind}` for the whole file) so the inner loop "
                f"(-m 'not slow and not ray and not process') leaves it out")


class _MarkerMissing(RuntimeError):
    """Raised where an unmarked test starts Ray or a process (if some ``except`` swallows it, the test still fails:
    the violation is also kept for its report)."""


def _install_guard(guard: _Guard) -> list:
    """Wrap every way a test starts a process or Ray; returns the undo list of (owner, name, original)."""
    import functools
    import importlib.abc
    import importlib.machinery
    import multiprocessing.process
    import os
    import subprocess
    import sys

    undo: list = []

    def wrap(owner, name: str, what: str, kind: str | None = None) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def guarded(*args, **kwargs):
            guard.event(kind or guard.kind(sys._getframe(1)), what)
            return original(*args, **kwargs)

        undo.append((owner, name, original))
        setattr(owner, name, guarded)

    wrap(subprocess.Popen, "_execute_child", "subprocess.Popen")
    for name in ("posix_spawn", "posix_spawnp"):  # not os.system: tests pickle it as a planted exploit
        if hasattr(os, name):
            wrap(os, name, f"os.{name}")
    wrap(multiprocessing.process.BaseProcess, "start", "multiprocessing start")
    # os.fork cannot be failed from inside: record it, and the test fails at its report
    os.register_at_fork(before=lambda: guard.item is not None and guard.need(guard.item, guard.kind(sys._getframe(1)), "os.fork"))

    def wrap_ray_init(worker) -> None:
        if getattr(worker.init, "_densitune_guarded", False):
            return
        wrap(worker, "init", "ray._private.worker.init", "ray")
        worker.init._densitune_guarded = True
        # a Ray this process already runs (another test's session fixture) used without a start: ray.get, ray.put,
        # .remote() and Tune all check the worker is connected first
        wrap(worker.Worker, "check_connected", "a Ray already running in this process", "ray")

    if "ray._private.worker" in sys.modules:  # already imported: patch both names of init
        wrap_ray_init(sys.modules["ray._private.worker"])
        import ray

        undo.append((ray, "init", ray.init))
        ray.init = sys.modules["ray._private.worker"].init
    else:  # patch init as the module is executed, before ``ray/__init__`` binds ``ray.init`` to it

        class RayInitFinder(importlib.abc.MetaPathFinder):
            def find_spec(self, fullname, path, target=None):
                if fullname != "ray._private.worker":
                    return None
                spec = importlib.machinery.PathFinder.find_spec(fullname, path)
                if spec is None or spec.loader is None:
                    return spec
                exec_module = spec.loader.exec_module

                def exec_and_guard(module) -> None:
                    exec_module(module)
                    wrap_ray_init(module)

                spec.loader.exec_module = exec_and_guard  # type: ignore[method-assign]
                return spec

        finder = RayInitFinder()
        sys.meta_path.insert(0, finder)
        undo.append((None, finder, None))
    return undo


def pytest_configure(config) -> None:
    import os

    mode = os.environ.get(GUARD_ENV, "")
    if mode and not mode.startswith("record:"):
        raise pytest.UsageError(f"{GUARD_ENV} must be empty or record:FILE, not {mode!r}")
    guard = _Guard(mode.removeprefix("record:") or None)
    # a plugin, not conftest hooks: a conftest's hooks do not see the setup of session-scoped fixtures
    config.pluginmanager.register(_GuardPlugin(guard, _install_guard(guard)), "densitune-marker-guard")


class _GuardPlugin:
    """The guard's pytest hooks: which test is running, which fixture is being set up, and the reports."""

    def __init__(self, guard: _Guard, undo: list) -> None:
        self.guard, self.undo = guard, undo

    def pytest_unconfigure(self, config) -> None:
        import json
        import sys

        guard = self.guard
        guard.item = None
        for owner, name, original in reversed(self.undo):
            if owner is None:
                sys.meta_path.remove(name)
            else:
                setattr(owner, name, original)
        if guard.record:
            with open(guard.record, "w") as f:
                json.dump({k: sorted(v) for k, v in sorted(guard.needs.items())}, f, indent=1)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        self.guard.item = item
        yield
        self.guard.item = None

    def pytest_sessionstart(self, session) -> None:
        # code_version() asks git once per process and caches the answer: ask before the first test, so that
        # no test is charged with that process (whichever test came first would be, order-dependently)
        from densitune.results.store import code_version

        code_version()

    def check_fixtures(self, item) -> None:
        """Fail ``item`` for the fixtures it uses (set up before it, e.g. of session scope, or requested with
        ``getfixturevalue``) that started Ray or a process."""
        guard = self.guard
        used = set(item.fixturenames) | set(getattr(getattr(item, "_request", None), "_fixture_defs", None) or ())
        for name in sorted(used):
            for kind in sorted(guard.fixture_needs.get(name, ())):
                guard.need(item, kind, f"through the fixture {name!r}")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        self.check_fixtures(item)
        yield
        self.check_fixtures(item)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield
        self.check_fixtures(item)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(self, fixturedef, request):
        self.guard.fixtures.append(fixturedef.argname)
        try:
            yield
        finally:
            self.guard.fixtures.pop()

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        outcome = yield
        guard = self.guard
        report = outcome.get_result()
        if guard.violations:
            shown = str(report.longrepr or "")
            unseen = [v for v in guard.violations if v not in shown]  # a swallowed _MarkerMissing, an os.fork, a fixture
            if unseen:
                report.outcome = "failed"
                report.longrepr = "\n".join(unseen) + (f"\n\n{shown}" if shown else "")
            guard.violations.clear()
