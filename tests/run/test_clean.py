"""``densitune clean RUN`` after a SIGKILLed driver: that run's Ray processes stop, other Ray instances live on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from densitune.run.cleanup import SESSION_FILE, _alive, read_session, session_processes


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.process
def test_clean_stops_only_the_dead_drivers_ray_and_prunes(trained_models, ray_session, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-m", "densitune", "search", "--out", str(out), "--models", str(trained_models), "-D", "4",
            "--eps-grid", *[str(i / 1000) for i in range(30)], "--test-ood", "noise-uniform", "--eval-limit", "40",
            "--num-cpus", "1", "-q"]
    driver = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    exp = out / "results" / "experiment=search"
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and driver.poll() is None:
        if (out / SESSION_FILE).is_file() and exp.is_dir() and any(exp.glob("search-*.parquet")):
            break
        time.sleep(0.2)
    assert driver.poll() is None, "the search ended before it could be killed"
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    info = json.loads((out / SESSION_FILE).read_text())
    assert info["driver"]["pid"] == driver.pid
    # our own Ray (the ray_session fixture) is another session: it must not be among the run's processes
    own_session = ray_session._private.worker._global_node.get_session_dir_path()
    assert own_session != info["session_dir"]
    time.sleep(1.0)
    # Ray's own processes may or may not outlive a SIGKILLed driver (the issue saw two agents stay);
    # whatever of that session is alive now must be gone after clean.
    orphans = [p.pid for p in session_processes(read_session(out / SESSION_FILE)) if _alive(p.pid)]
    node = ray_session._private.worker._global_node
    own = {i.process.pid for infos in node.all_processes.values() for i in infos if i.process}
    assert own
    assert not own & set(orphans) and os.getpid() not in orphans

    p = subprocess.run([sys.executable, "-m", "densitune", "clean", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "orphaned Ray process" in p.stdout
    time.sleep(0.5)
    assert not [pid for pid in orphans if _alive(pid)]
    assert not list((out / "tune").glob("search-*")) and not list((out / "cache").rglob("*.lock"))
    assert any(exp.glob("search-*.parquet"))  # results are kept
    # the other Ray instance still works
    assert ray_session.get(ray_session.remote(lambda: 41 + 1).remote()) == 42
    # a second clean has nothing left to stop
    p = subprocess.run([sys.executable, "-m", "densitune", "clean", str(out)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("stopped 0 ")
