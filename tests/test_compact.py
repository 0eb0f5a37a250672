"""Compaction: each finished experiment's small files merged into one, and readers return exactly the
original rows after a kill at any point of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from densitune.runlock import writer_lock
from densitune.search.results.rows import provenance
from densitune.search.results.store import read_results, result_files, write_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)
FAILPOINTS = ["compact:manifest", "compact:merged-written", "compact:merged-published", "compact:deleting"]


def _rows(run: Path) -> list[tuple]:
    table = read_results(run / "results")
    return sorted(tuple(sorted((k, str(v)) for k, v in r.items())) for r in table.to_pylist())


@pytest.fixture
def run(tmp_path) -> Path:
    root = tmp_path / "run"
    for exp in ("a", "b"):
        for i in range(6):
            rows = [dict(experiment=exp, trial_id=f"t{i}", stage="search", protocol="val-ood:v", backbone="cnn",
                         id_dataset="digits", loss="ce", D=8, spectral=True, density="gmm_sum", score="density",
                         eps=i / 100, seed=s, started_at=T0, ood_dataset=o, split=sp, **provenance("cpu"),
                         auroc=0.5 + i / 20 + s / 100, auprc=0.6, fpr95=0.3)
                    for s in (0, 1) for o, sp in (("v", "val"), ("t", "test"))]
            write_rows(root / "results", rows, name=f"t{i}")
    return root


def _compact(run: Path, failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **({"DENSITUNE_FAILPOINT": failpoint} if failpoint else {})}
    return subprocess.run([sys.executable, "-m", "densitune", "compact", str(run)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_compact_merges_files_and_keeps_every_row(run):
    before = _rows(run)
    assert len(result_files(run / "results")) == 12
    p = _compact(run)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["a: 6 files merged into one (24 rows)", "b: 6 files merged into one (24 rows)"]
    assert len(result_files(run / "results")) == 2 and not list(run.rglob("_compact-*"))
    assert _rows(run) == before


@pytest.mark.parametrize("failpoint", FAILPOINTS)
def test_a_killed_compaction_never_changes_what_readers_see(run, failpoint):
    before = _rows(run)
    p = _compact(run, failpoint)
    assert p.returncode == -9  # really killed there
    assert _rows(run) == before  # no row twice, none missing
    again = _compact(run)  # the next compaction finishes the job
    assert again.returncode == 0, again.stderr
    assert _rows(run) == before and len(result_files(run / "results")) == 2
    assert not [f for f in (run / "results").rglob("*") if f.name.startswith((".tmp", "_compact"))]


def test_compaction_skips_an_experiment_whose_writer_is_running(run):
    before = _rows(run)
    with writer_lock(run, "search", "a"):
        p = _compact(run)
    assert p.returncode == 0, p.stderr
    out = p.stdout.splitlines()
    assert out[0].startswith("a: skipped, experiment 'a' of") and "is being written by pid" in out[0]
    assert out[1] == "b: 6 files merged into one (24 rows)"
    assert _rows(run) == before
    assert len(result_files(run / "results", "a")) == 6


def test_readers_and_resume_after_compaction(run, tmp_path):
    """report reads the merged files; copying a compacted run keeps its rows (no hidden state)."""
    assert _compact(run).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert _rows(copy) == _rows(run)
    p = subprocess.run([sys.executable, "-m", "densitune", "report", str(copy)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
