"""Bounded storage calls and the writer lock's fence, in process: the per-request timeout and its checks; a stuck
call gives up within its budget and a real SIGINT ends the wait at once; storage errors become one line; a holder
whose lock was taken over refuses to publish, and its renewal thread stops the main thread the way Ctrl-C does
(the bucket cases run against moto in tests/app/test_bucket_faults.py)."""

from __future__ import annotations

import json
import signal
import threading
import time

import pytest

from densitune.errors import ConfigError
from densitune.run import runstore
from densitune.run.runlock import LockLost, writer_lease
from densitune.run.runstore import StoreStalled, bounded, storage_timeout, use_storage_timeout
from densitune.run.storage import storage_error


def test_the_storage_timeout_comes_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv(runstore.TIMEOUT_ENV, raising=False)
    assert storage_timeout() == runstore.DEFAULT_TIMEOUT_S == 30.0
    monkeypatch.setenv(runstore.TIMEOUT_ENV, "7.5")
    assert storage_timeout() == 7.5
    use_storage_timeout(2)  # --storage-timeout 2: this process and the workers it starts
    assert storage_timeout() == 2.0 and runstore.call_budget() == 2.0 * 4 + 2.0 * 4 + 5.0
    for bad in ("0", "-1", "nan", "inf", "soon"):
        monkeypatch.setenv(runstore.TIMEOUT_ENV, bad)
        with pytest.raises(ConfigError, match="must be a positive number of seconds"):
            storage_timeout()


def test_a_stuck_call_gives_up_within_its_budget_naming_the_call_and_the_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    never = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(StoreStalled, match=r"object store at http://127\.0\.0\.1:9 did not answer GET s3://b/k within 1 s"):
        bounded("GET s3://b/k", never.wait, budget=1.0)
    assert time.monotonic() - t0 < 3
    assert runstore.stuck_calls() >= 1  # the helper thread still hangs: the CLI exits past it
    never.set()
    assert bounded("PUT s3://b/k", lambda: 42, budget=1.0) == 42


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler, as the CLI has it (a Tune run in this process may have left its own)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_a_first_sigint_ends_the_wait_for_a_stuck_call(python_sigint):
    never = threading.Event()
    main = threading.main_thread().ident
    threading.Timer(0.5, lambda: signal.pthread_kill(main, signal.SIGINT)).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        bounded("LIST s3://b/run", never.wait, budget=60.0)
    assert time.monotonic() - t0 < 3
    never.set()


def test_storage_errors_become_one_line(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    denied = storage_error(OSError("When getting information for key 'run/results' in bucket 'bk': AWS Error "
                                   "ACCESS_DENIED during HeadObject operation: No response body."))
    assert str(denied) == ("s3://bk/run/results: the object store at http://127.0.0.1:9 refused the credentials "
                           "(ACCESS_DENIED during HeadObject); check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_PROFILE")
    missing = storage_error(OSError("Bucket 'gone' not found: AWS Error NO_SUCH_BUCKET during ListObjectsV2"))
    assert missing is not None and "no such bucket" in str(missing)
    vanished = storage_error(ValueError("No experiment snapshot file of form 'experiment_state-*.json' was found"))
    assert vanished is not None and "Ray Tune state vanished" in str(vanished)
    assert storage_error(OSError(2, "No such file or directory")) is None
    assert storage_error(ValueError("a bug")) is None


def _take_over(path, token: str = "someone-else") -> None:
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "command": "search", "token": token}))


def test_a_holder_whose_lease_may_have_lapsed_publishes_only_while_the_lock_is_still_its_own(tmp_path):
    with writer_lease(tmp_path, "search", "e") as held:
        held.check()  # fresh
        held.fence.check()  # what each trial does: the lock is its driver's
        held.renewed_at -= 10_000  # paused far past its lease
        held.check()  # the lock is still its own and was renewed lately: it goes on
        assert held.fresh()
        _take_over(held.path)
        held.renewed_at -= 10_000
        with pytest.raises(LockLost, match="lost the writer lock .*another process took it over"):
            held.check()
        with pytest.raises(LockLost):
            held.fence.check()
        assert held.lost is not None
    assert json.loads(held.path.read_text())["token"] == "someone-else"  # never deletes another writer's lock


def test_the_renewal_thread_stops_the_main_thread_when_the_lock_was_taken_over(tmp_path, monkeypatch, python_sigint):
    monkeypatch.setenv("DENSITUNE_LOCK_LEASE_S", "3")  # renewals every 0.5 s
    with writer_lease(tmp_path, "search", "e") as held:
        _take_over(held.path)
        t0 = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            time.sleep(30)
        assert time.monotonic() - t0 < 5
        assert "another process took it over" in (held.lost or "")
