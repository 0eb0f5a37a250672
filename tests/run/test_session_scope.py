"""Process scope: a session file proves which processes densitune may signal, or it proves nothing.

Real processes (``sleep`` decoys, a child Python) stand in for Ray's; the selection function must return
none of them for a tampered record, and exactly the marked descendants for a true one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from densitune.run.cleanup import (
    MARKER_ENV,
    SESSION_FILE,
    SessionFileError,
    clean_run,
    parse_session,
    process_id,
    session_processes,
)

MARKER = "0123456789abcdef0123456789abcdef"


def _record(*procs, marker=MARKER, uid=None, driver=None, **extra):
    info = {"format": "densitune-ray-session", "version": 2, "marker": marker,
            "uid": os.getuid() if uid is None else uid, "session_dir": "/tmp/ray/session_x",
            "driver": driver or {"pid": 2, "start": 0},
            "processes": [p if isinstance(p, dict) else vars(process_id(p)) for p in procs]}
    info.update(extra)
    return info


@pytest.fixture
def decoys():
    """Two live processes: one carrying the marker in its environment, one not (same command line)."""
    env = dict(os.environ, **{MARKER_ENV: MARKER})
    plain = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
    marked = subprocess.Popen(["sleep", "60"], env=env)
    unmarked = subprocess.Popen(["sleep", "60"], env=plain)
    time.sleep(0.1)
    yield marked, unmarked
    for p in (marked, unmarked):
        p.kill()
        p.wait()


def _pids(info) -> list[int]:
    return [p.pid for p in session_processes(parse_session(info))]


@pytest.mark.process
def test_a_true_record_proves_its_marked_processes_only(decoys):
    marked, unmarked = decoys
    assert _pids(_record(marked.pid)) == [marked.pid]
    assert _pids(_record(unmarked.pid)) == []  # right pid and start time, but no marker: not ours


@pytest.mark.parametrize("info", [
    {"driver_pid": 999999, "session_dir": "", "pids": []},  # the old form: a substring "" matched every process
    {"driver_pid": 999999, "session_dir": "/", "pids": [1]},
    _record(marker=""),
    _record(marker="x" * 32),
    _record(uid=os.getuid() + 1),
    _record({"pid": 1, "start": 0}),  # PID 1
    _record({"pid": 2**70, "start": 0}),  # absurd numbers
    _record({"pid": True, "start": 0}),
    _record({"pid": "1", "start": 0}),
    _record({"pid": 5, "start": 0, "cmd": "x"}),
    _record(processes="all"),
    [], "", None, 7,
], ids=["v1-empty", "v1-root", "no-marker", "bad-marker", "other-user", "pid-1", "huge-pid", "bool-pid", "str-pid",
        "extra-key", "not-a-list", "list", "string", "null", "number"])
def test_a_tampered_record_is_refused(info):
    with pytest.raises(SessionFileError):
        parse_session(info)


@pytest.mark.process
def test_a_reused_pid_is_not_the_recorded_process(decoys):
    marked, _ = decoys
    start = process_id(marked.pid).start
    assert _pids(_record({"pid": marked.pid, "start": start + 1})) == []
    assert _pids(_record({"pid": marked.pid, "start": start})) == [marked.pid]


@pytest.mark.process
def test_the_callers_own_ancestors_are_never_selected(tmp_path):
    """A child carrying the marker asks for a record that names itself, its parent (also marked) and a
    marked sibling decoy: only the decoy may come back."""
    script = """
import json, os, subprocess, sys, time
from densitune.run.cleanup import parse_session, process_id, session_processes
decoy = subprocess.Popen(["sleep", "60"])
time.sleep(0.1)
me, parent = process_id(os.getpid()), process_id(os.getppid())
info = json.loads(sys.argv[1])
info["processes"] = [vars(me), vars(parent), vars(process_id(decoy.pid))]
print(json.dumps({"decoy": decoy.pid, "found": [p.pid for p in session_processes(parse_session(info))]}))
decoy.kill()
"""
    outer = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2]]).returncode)"
    env = dict(os.environ, **{MARKER_ENV: MARKER})
    p = subprocess.run([sys.executable, "-c", outer, script, json.dumps(_record())], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["found"] == [out["decoy"]]


@pytest.mark.process
@pytest.mark.parametrize("text", ['{"driver_pid": 1, "session_dir": "", "pids": []}', "[" * 100_000, "\xff\xfe", "{}"])
def test_clean_run_ignores_a_tampered_file_and_signals_nothing(tmp_path, decoys, text):
    marked, unmarked = decoys
    (tmp_path / SESSION_FILE).write_bytes(text.encode("utf-8", "surrogateescape") if text != "\xff\xfe" else b"\xff\xfe")
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "a.lock").write_text("")
    done = clean_run(tmp_path)
    assert done.ignored and SESSION_FILE in done.ignored
    assert done.stopped == [] and done.removed == []
    assert marked.poll() is None and unmarked.poll() is None
    assert (tmp_path / "cache" / "a.lock").exists() and (tmp_path / SESSION_FILE).exists()


@pytest.mark.process
def test_clean_run_stops_a_proven_orphan(tmp_path, decoys):
    marked, unmarked = decoys
    gone = subprocess.Popen(["sleep", "0.5"])
    dead_driver = vars(process_id(gone.pid))
    gone.wait()
    (tmp_path / SESSION_FILE).write_text(json.dumps(_record(marked.pid, unmarked.pid, driver=dead_driver)))
    done = clean_run(tmp_path)
    assert done.ignored is None and done.stopped == [marked.pid]
    assert marked.wait(timeout=10) is not None and unmarked.poll() is None
