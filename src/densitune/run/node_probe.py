"""What one node of a cluster has: the facts ``densitune doctor`` compares with the driver's.

:func:`node_facts` runs inside a Ray task on each node (and once in the driver). It is shipped *by value*
(:func:`densitune.run.ray_runtime.on_every_node` registers this module with Ray's cloudpickle), so it runs on a node
whose own densitune is another install, or none: that is what it has to find out. So it imports nothing from
densitune, and reads the densitune a node's Python would import from the installed distributions (the first on
its path) without importing it; besides the standard library it uses pyarrow (for a bucket) and torch (where the
node offers GPUs).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shutil
import socket
import tempfile
import uuid
from importlib.metadata import PackageNotFoundError, version
from typing import Any

#: Test-only: a node whose environment sets this runs the GPUs it declares on the CPU (the README names it).
FAKE_GPU_ENV = "DENSITUNE_TEST_FAKE_GPU"
#: Name prefix of the probe object/file ``--out`` gets (removed again at once).
PROBE_PREFIX = ".densitune-doctor-"


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "missing"


def _first_line(e: BaseException) -> str:
    text = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _existing_folder(path: str) -> str:
    """``path`` or its nearest existing ancestor (a run folder that does not exist yet is created by the run)."""
    p = os.path.abspath(path)
    while not os.path.exists(p) and os.path.dirname(p) != p:
        p = os.path.dirname(p)
    return p


def _write_probe(out: str) -> str | None:
    """Write and remove a probe object (bucket) or file (folder) under ``out``; None when that worked, else why not."""
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        if "://" in out and not out.startswith("file://"):
            import pyarrow.fs as pafs

            scheme, rest = out.split("://", 1)
            if scheme == "s3":  # as the run store does: an S3-compatible server from the node's AWS_ENDPOINT_URL
                kwargs: dict[str, Any] = {}
                if os.environ.get("AWS_ENDPOINT_URL"):
                    kwargs["endpoint_override"] = os.environ["AWS_ENDPOINT_URL"]
                if os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
                    kwargs["region"] = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
                fs: Any = pafs.S3FileSystem(**kwargs)
            else:
                fs, rest = pafs.FileSystem.from_uri(out)
            key = f"{rest.rstrip('/')}/{name}"
            with fs.open_output_stream(key) as f:
                f.write(b"densitune doctor probe\n")
            fs.delete_file(key)
            return None
        folder = _existing_folder(out.removeprefix("file://"))
        if not os.path.isdir(folder):
            return f"{folder} is not a folder"
        probe = os.path.join(folder, name)
        with open(probe, "x") as f:
            f.write("densitune doctor probe\n")
        os.remove(probe)
        return None
    except Exception as e:  # noqa: BLE001 - any failure is the answer
        return _first_line(e)


def _readable(folder: str) -> str | None:
    try:
        if not os.path.isdir(folder):
            return "not a folder" if os.path.exists(folder) else "does not exist"
        os.listdir(folder)
        return None
    except OSError as e:
        return _first_line(e)


def node_facts(out: str | None, data_root: str | None, gpus: float) -> dict[str, Any]:
    """The versions this process runs, whether it sees CUDA (when ``gpus`` > 0), whether it can write ``out`` and
    read ``data_root``, and the free disk of its temp folder (and of a local ``out``), in bytes."""
    facts: dict[str, Any] = {"python": platform.python_version(), "torch": _version("torch"), "ray": _version("ray"),
                             "densitune": _version("densitune"), "host": socket.gethostname()}
    spec = importlib.util.find_spec("densitune")  # where its package is found, without importing it
    facts["densitune_at"] = next(iter(spec.submodule_search_locations or []), "?") if spec else "missing"
    facts["cuda"] = None
    if gpus > 0:
        if os.environ.get(FAKE_GPU_ENV) == "1":
            facts["cuda"] = "fake (test)"
        else:
            try:
                import torch

                n = torch.cuda.device_count() if torch.cuda.is_available() else 0
                facts["cuda"] = f"{n} device(s), CUDA {torch.version.cuda}" if n else ""
            except Exception as e:  # noqa: BLE001
                facts["cuda"] = ""
                facts["cuda_error"] = _first_line(e)
    facts["out_error"] = _write_probe(out) if out else None
    facts["data_root_error"] = _readable(data_root) if data_root else None
    disks = [tempfile.gettempdir()]
    if out and ("://" not in out or out.startswith("file://")):
        disks.append(_existing_folder(out.removeprefix("file://")))
    free = {}
    for d in disks:
        try:
            free[d] = shutil.disk_usage(d).free
        except OSError:
            continue
    facts["free"] = free
    return facts
