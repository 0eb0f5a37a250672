"""Ray nodes a test starts itself (``ray start``), each with its own temp dir and its own ports, stopped by PID.

Several raylets on one host need a temp dir each; the ports come from this test tier's range so that tests of
other checkouts on the same machine never meet them. Only processes whose command line names one of the test's
temp dirs are ever signalled (``ray stop`` would stop every Ray of the machine's user).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

#: Ports of servers the cluster tests start (GCS, dashboard, raylets, agents, workers).
PORT_RANGE = range(19400, 19600)


#: Put in the environment of every node a test starts (``marked``): every process of those nodes inherits it, also
#: the agents and workers whose command line (``ray::...``) names no temp dir and that outlive a killed raylet.
MARKER = "DENSITUNE_TEST_RAY"


def marked(env: dict[str, str], temp_dir: str) -> dict[str, str]:
    """``env`` with the mark of ``temp_dir``'s nodes."""
    return {**env, MARKER: temp_dir}


def ray_pids(temp_dir: str) -> list[int]:
    """PIDs of this test's Ray processes: their command line names ``temp_dir``, or their environment holds its mark."""
    mark = f"{MARKER}={temp_dir}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                ours = temp_dir in cmd or mark in (d / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if ours:
                pids.append(int(d.name))
    return pids


def stop_ray(temp_dir: str) -> None:
    """SIGTERM, then SIGKILL, every process of ``temp_dir``'s Ray; returns once none is left (or after 10 s each)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in ray_pids(temp_dir):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while ray_pids(temp_dir) and time.monotonic() < deadline:
            time.sleep(0.2)


def free_ports() -> Iterator[int]:
    """Ports of :data:`PORT_RANGE` nobody listens on now, each handed out once."""
    for port in PORT_RANGE:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        yield port


def node_ports(ports: Iterator[int], *, head: bool, workers: int = 12) -> list[str]:
    """``ray start`` flags that put every fixed port of one node in :data:`PORT_RANGE` (its workers' ports too)."""
    names = ["node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
             "metrics-export-port", "runtime-env-agent-port"]
    if head:
        names += ["port", "dashboard-port", "ray-client-server-port"]
    flags = [f"--{name}={next(ports)}" for name in names]
    worker_ports = [next(ports) for _ in range(workers)]
    return [*flags, f"--worker-port-list={','.join(map(str, worker_ports))}"]


def ray_start(temp_dir: str, *flags: str, env: dict[str, str], timeout: int = 300) -> None:
    """``ray start --temp-dir=temp_dir FLAGS`` (the nodes' own environment ``env``); raises with Ray's output.

    A raylet gets 2 minutes to register (Ray's default, 30 s, is too short on 2 busy cores)."""
    env = {"RAY_raylet_start_wait_time_s": "120", **env}
    p = subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "start", f"--temp-dir={temp_dir}",
                        "--disable-usage-stats", *flags], capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"ray start {' '.join(flags)} failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")


def flag_value(flags: list[str], name: str) -> str:
    (value,) = [f.split("=", 1)[1] for f in flags if f.startswith(f"--{name}=")]
    return value
