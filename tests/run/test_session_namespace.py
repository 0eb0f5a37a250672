"""In a fresh PID namespace, planted session files make densitune signal none of the decoys around it.

Run as root only (``unshare --pid --fork --mount-proc``; skipped elsewhere). Inside the namespace a script
starts decoy processes: ones whose command line holds the planted session folder, one running as ``nobody``
(``setpriv``) that carries the planted marker, one recorded with a wrong start time, and the namespace's
PID 1 (the script itself). For each tampered file, ``densitune clean`` and then ``train`` and ``search`` on the
same run must leave every decoy alive: a file that is not densitune's makes ``clean`` exit 2 naming it, and
``train``/``search`` warn in one line and go on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare") or not shutil.which("setpriv"),
                                reason="needs root, unshare and setpriv")

SCRIPT = r'''
import json, os, subprocess, sys, time
from pathlib import Path
from densitune.run.cleanup import MARKER_ENV, SESSION_FILE, process_id

run = Path(sys.argv[1])
marker = "ab" * 16
session = "/tmp/ray/session_planted"
env = {k: v for k, v in os.environ.items() if k != MARKER_ENV}
sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
decoys = {
    "cmdline-names-session": subprocess.Popen([*sleeper, session, "raylet"], env=env),
    "cmdline-empty-match": subprocess.Popen([*sleeper, "gcs_server"], env=env),
    "nobody-with-marker": subprocess.Popen(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", *sleeper],
                                           env={**env, MARKER_ENV: marker}),
    "root-wrong-start": subprocess.Popen(sleeper, env={**env, MARKER_ENV: marker}),
}
time.sleep(0.5)
ids = {k: process_id(p.pid) for k, p in decoys.items()}
assert os.getpid() == 1, os.getpid()
me = process_id(1)
v2 = lambda procs, **kw: {"format": "densitune-ray-session", "version": 2, "marker": marker, "uid": os.getuid(),
                          "session_dir": session, "driver": {"pid": 999999, "start": 0}, "processes": procs, **kw}
planted = {
    "v1-empty-session-dir": {"driver_pid": 999999, "session_dir": "", "pids": [1]},
    "v1-root-session-dir": {"driver_pid": 999999, "session_dir": "/", "pids": [d.pid for d in ids.values()]},
    "pid-1": v2([{"pid": 1, "start": me.start}]),
    "nobody-process": v2([vars(ids["nobody-with-marker"])]),
    "reused-pid": v2([{"pid": ids["root-wrong-start"].pid, "start": ids["root-wrong-start"].start + 7}]),
    "unmarked-processes": v2([vars(ids["cmdline-names-session"]), vars(ids["cmdline-empty-match"])]),
    "ancestor-driver": v2([vars(me)], driver={"pid": 1, "start": me.start + 1}),
    "other-user": v2([vars(ids["nobody-with-marker"])], uid=65534),
}
def densitune(*args):
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, timeout=600, env=env)

out = {"clean": {}, "alive": {}}
for name, info in planted.items():
    (run / SESSION_FILE).write_text(json.dumps(info))
    p = densitune("clean", str(run))
    out["clean"][name] = [p.returncode, p.stderr.strip().splitlines(), p.stdout.strip()]
    out["alive"][name] = sorted(k for k, d in decoys.items() if d.poll() is None)
common = ["--out", str(run), "--num-cpus", "1", "-q"]
(run / SESSION_FILE).write_text(json.dumps(planted["v1-empty-session-dir"]))
t = densitune("train", *common, "-D", "4", "--epochs", "1", "--train-limit", "200")
out["train"] = [t.returncode, t.stderr.strip().splitlines()]
out["alive"]["train"] = sorted(k for k, d in decoys.items() if d.poll() is None)
(run / SESSION_FILE).write_text(json.dumps(planted["pid-1"]))
s = densitune("search", *common, "--eps-grid", "0", "0.01", "--eval-limit", "40", "--test-ood", "noise-uniform")
out["search"] = [s.returncode, s.stderr.strip().splitlines()]
out["alive"]["search"] = sorted(k for k, d in decoys.items() if d.poll() is None)
print(json.dumps(out))
for d in decoys.values():
    d.kill()
'''


@pytest.mark.slow
@pytest.mark.process
def test_planted_session_files_leave_every_decoy_alive(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.chmod(tmp_path, 0o755)  # nobody's decoy needs nothing here, but keep the tree readable
    p = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", SCRIPT, str(run)],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    everyone = ["cmdline-empty-match", "cmdline-names-session", "nobody-with-marker", "root-wrong-start"]
    for name, alive in out["alive"].items():
        assert alive == everyone, (name, alive)
    for name in ("v1-empty-session-dir", "v1-root-session-dir", "pid-1", "other-user", "ancestor-driver"):  # refused
        rc, err, _ = out["clean"][name]
        assert rc == 2 and len(err) == 1 and "ray-session.json" in err[0] and "Traceback" not in err[0], (name, err)
    for name in ("nobody-process", "reused-pid", "unmarked-processes"):  # well-formed, proves none
        rc, err, stdout = out["clean"][name]
        assert (rc, stdout.split()[:2]) == (0, ["stopped", "0"]), (name, rc, err, stdout)
    for command in ("train", "search"):
        rc, err = out[command]
        assert rc == 0, (command, err)
        assert [line for line in err if "ray-session.json" in line and "ignoring" in line], (command, err)
