"""A run folder is untrusted input: a table of planted files, in real processes.

Each case plants something in a run (or passes a string that becomes part of a path) and runs one real
``densitune`` command. For every case: the exit status is 2, stderr is exactly one ``densitune: error:`` line
(or, where the input is ignored, one ``WARNING`` line and the command goes on), no traceback, and nothing
outside the run changed: ``outside/`` (where planted links point) keeps its exact files and bytes.
Classes, at least four inputs each: session files, symbolic links, run-file JSON, path components, images.
(Compaction manifests: ``test_untrusted_manifests.py``; session files in a PID namespace with decoys:
``test_session_namespace.py``.)
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

EPS = ["--eps-grid", "0", "0.01", "--eval-limit", "40", "-D", "4", "--num-cpus", "1", "-q"]


def _png(w: int, h: int) -> bytes:
    """A PNG whose header declares w x h pixels (the data is tiny): a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def _image_folder(root: Path, bad_name: str, bad: bytes) -> Path:
    """An OOD image folder of real 8x8 PNGs and one bad file."""
    root.mkdir(parents=True)
    for i in range(6):
        Image.new("L", (8, 8), color=i * 40).save(root / f"ok{i}.png")
    (root / bad_name).write_bytes(bad)
    return root


def _session(**kw) -> str:
    return json.dumps({"format": "densitune-ray-session", "version": 2, "marker": "ab" * 16, "uid": os.getuid(),
                       "session_dir": "", "driver": {"pid": 999999, "start": 0}, "processes": [], **kw})


def _plant(case: str, run: Path, outside: Path, models: Path) -> list[str]:
    """Plant ``case`` in ``run``; returns the densitune command line to run."""
    run.mkdir(parents=True, exist_ok=True)
    train = ["train", "--out", str(run), "-D", "4", "--epochs", "1", "--train-limit", "100", "--num-cpus", "1", "-q"]
    search = ["search", "--out", str(run), "--models", str(models), "--test-ood", "noise-uniform", *EPS]
    kind, _, what = case.partition(":")
    if kind == "session":
        text = {"empty-dir": json.dumps({"driver_pid": 1, "session_dir": "", "pids": []}),
                "root-dir": json.dumps({"driver_pid": 1, "session_dir": "/", "pids": [1]}),
                "huge-pid": _session(processes=[{"pid": 2**70, "start": 0}]),
                "not-utf8": "\udcff{}", "deep": "[" * 50_000}[what]
        (run / "ray-session.json").write_bytes(text.encode("utf-8", "surrogateescape"))
        return ["clean", str(run)]
    if kind == "link":
        target = {"results": outside, "log": outside / "victim.txt", "locks": outside, "models": outside,
                  "tune": outside, "cache-entry": outside}[what]
        where = {"results": "results", "log": "densitune.log", "locks": "locks", "models": "models/default",
                 "tune": "tune", "cache-entry": "cache/planted"}[what]
        (run / where).parent.mkdir(parents=True, exist_ok=True)
        (run / where).symlink_to(target)
        return train
    if kind == "json":
        if what == "spec-deep":  # a stored search spec, read by --resume
            exp = run / "results" / "experiment=search"
            exp.mkdir(parents=True)
            (exp / "_spec.json").write_text("[" * 100_000)
            return [*search, "--resume"]
        if what == "spec-not-utf8":
            exp = run / "results" / "experiment=search"
            exp.mkdir(parents=True)
            (exp / "_spec.json").write_bytes(b"\xff\xfe\x00{")
            return [*search, "--resume"]
        if what == "lock-huge-pid":  # a live-looking lock whose pid is no pid: judged by its age, refused in one line
            (run / "locks").mkdir(parents=True)
            (run / "locks" / "default.json").write_text(json.dumps({"host": os.uname().nodename, "pid": 2**70}))
            return train
        if what in ("config-deep", "config-nan"):  # a checkpoint's config.json among the models searched
            planted = run / "models-planted"
            shutil.copytree(models, planted)
            cfg = next(planted.rglob("config.json"))
            cfg.write_text("{" * 0 + "[" * 100_000 if what == "config-deep" else '{"config": NaN}')
            return ["search", "--out", str(run), "--models", str(planted), "--test-ood", "noise-uniform", *EPS]
    if kind == "name":
        spec = run.parent / f"spec-{what}.yaml"
        if what == "long-experiment":
            return [*train[:-1], "--experiment", "a" * 250, "-q"]
        values = {"nul-experiment": 'experiment: "a\\0b"\n', "nul-data-root": 'data_root: "/tmp/a\\0b"\n',
                  "nul-folder-set": 'test_ood: ["folder:/tmp/a\\0b"]\n',
                  "long-component": f'test_ood: ["folder:/tmp/{"x" * 300}"]\n',
                  "long-spec-experiment": f"experiment: {'b' * 240}\n"}[what]
        spec.write_text(values)
        return ["search", "--out", str(run), "--models", str(models), "--spec", str(spec), *EPS]
    if kind == "image":
        bad = {"bomb": _png(100_000, 100_000), "warning-bomb": _png(12_000, 12_000), "text": b"not an image",
               "truncated": _png(8, 8)[:30]}[what]
        folder = _image_folder(run.parent / f"ood-{what}", "bad.png", bad)
        return ["search", "--out", str(run), "--models", str(models), "--test-ood", f"folder:{folder}", *EPS]
    raise AssertionError(case)


#: case -> the fragment its one stderr line holds
CASES = {
    "session:empty-dir": "ray-session.json", "session:root-dir": "ray-session.json", "session:huge-pid": "ray-session.json",
    "session:not-utf8": "ray-session.json", "session:deep": "ray-session.json",
    "link:results": "symbolic link", "link:log": "symbolic link", "link:locks": "symbolic link",
    "link:models": "symbolic link", "link:tune": "symbolic link", "link:cache-entry": "symbolic link",
    "json:spec-deep": "_spec.json", "json:spec-not-utf8": "_spec.json", "json:lock-huge-pid": "being written by",
    "json:config-deep": "config.json", "json:config-nan": "config.json",
    "name:long-experiment": "too long", "name:nul-experiment": "experiment name", "name:nul-data-root": "NUL",
    "name:nul-folder-set": "NUL", "name:long-component": "longer than 255", "name:long-spec-experiment": "too long",
    "image:bomb": "decompression bomb", "image:warning-bomb": "decompression bomb", "image:text": "bad.png",
    "image:truncated": "bad.png",
}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize("case", list(CASES))
def test_a_planted_run_file_is_one_line_and_acts_on_nothing_outside(case, tmp_path, trained_models):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("keep me")
    (outside / "keep.parquet").write_bytes(b"PAR1 not touched")
    before = _snapshot(outside)
    argv = _plant(case, tmp_path / "run", outside, trained_models)
    p = subprocess.run([sys.executable, "-m", "densitune", *argv], capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    errors = [ln for ln in lines if ln.startswith("densitune: error: ")]
    assert len(errors) == 1 and CASES[case] in errors[0], lines
    assert len(lines) <= 2 and all(ln.startswith("densitune: ") for ln in lines), lines  # at most one warning beside it
    assert _snapshot(outside) == before  # nothing outside the run written, changed or deleted
