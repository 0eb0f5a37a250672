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

from densitune.results.rows import provenance
from densitune.results.store import read_results, result_files, write_rows
from densitune.run.runlock import writer_lock

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


@pytest.mark.process
def test_compact_merges_files_and_keeps_every_row(run):
    before = _rows(run)
    assert len(result_files(run / "results")) == 12
    p = _compact(run)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["a: 6 files merged into one (24 rows)", "b: 6 files merged into one (24 rows)"]
    assert len(result_files(run / "results")) == 2 and not list(run.rglob("_compact-*"))
    assert _rows(run) == before


@pytest.mark.process
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


@pytest.mark.process
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


@pytest.mark.process
def test_readers_and_resume_after_compaction(run, tmp_path):
    """report reads the merged files; copying a compacted run keeps its rows (no hidden state)."""
    assert _compact(run).returncode == 0
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert _rows(copy) == _rows(run)
    p = subprocess.run([sys.executable, "-m", "densitune", "report", str(copy)], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr


# ------------------------------------------------------------------------------- rolling compaction (a running search)

def _merge(run: Path, experiment: str, names: list[str], failpoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """What the search driver does: ``RollingCompaction.finished`` for each of ``names``, in a process of its own."""
    code = ("import sys; from densitune.results.store import RollingCompaction\n"
            f"r = RollingCompaction({str(run / 'results')!r}, {experiment!r}, every={len(names)})\n"
            f"for n in {names!r}: r.finished(n)\n"
            "print(r.merged, len(r.pending))")
    env = {**os.environ, **({"DENSITUNE_FAILPOINT": failpoint} if failpoint else {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


@pytest.mark.process
@pytest.mark.parametrize("failpoint", [None, *FAILPOINTS])
def test_rolling_compaction_merges_only_finished_files_and_survives_a_kill(run, failpoint):
    before = _rows(run)
    folder = run / "results" / "experiment=a"
    writing = folder / ".tmp-search-t5-being-written.parquet"  # a trial still writing: never touched
    writing.write_bytes(b"PAR1 partial")
    p = _merge(run, "a", ["t0", "t1", "t2", "t-never-written"], failpoint)
    if failpoint is None:
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["3", "0"]  # three files merged, the missing name skipped
    else:
        assert p.returncode == -9  # really killed there
    assert _rows(run) == before  # no row twice, none missing, at every step
    again = _merge(run, "a", ["t0", "t1", "t2"])  # the next merge (or resume) finishes a killed one
    assert again.returncode == 0, again.stderr
    names = sorted(f.name for f in result_files(run / "results", "a"))
    assert names[0].startswith("compact-") and names[1:] == [f"search-t{i}.parquet" for i in (3, 4, 5)]
    assert _rows(run) == before and writing.read_bytes() == b"PAR1 partial"
    assert not list(folder.glob("_compact-*"))


@pytest.mark.ray
def test_a_search_merges_its_finished_trials_files_as_it_runs(ray_session, trained_models, tmp_path):
    """7 grid trials merged every 3: two merged files and one trial file; the same rows as a search that
    keeps one file per trial, and resume finds every trial done."""
    from densitune.search.models import discover, select
    from densitune.search.spec import SearchSpec
    from densitune.search.tune import SearchRun, completed_trials, run_search

    groups = select(discover(trained_models), (8,))
    spec = SearchSpec(experiment="roll", val_ood="digits-blend", test_ood=("noise-uniform",), eval_limit=60,
                      eps_grid=(0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05))
    tables = {}
    for every in (3, 0):
        run = SearchRun(results_dir=str(tmp_path / f"every{every}" / "results"), storage_path=str(tmp_path / f"tune{every}"),
                        compact_every=every)
        assert len(run_search(spec, groups, run, progress=False)) == 7
        files = sorted(f.name for f in result_files(run.results_dir, "roll"))
        if every == 3:
            assert [f.split("-")[0] for f in files] == ["compact", "compact", "search"]
            assert len(completed_trials(run.results_dir, "roll")) == 7
            assert run_search(spec, groups, run, resume=True, progress=False) is None  # nothing left to run
        else:
            assert len(files) == 7 and all(f.startswith("search-p-") for f in files)
        table = read_results(run.results_dir)
        assert table.num_rows == 7 * 2 * 2  # trials x seeds x (validation + test set)
        keep = ["eps", "seed", "ood_dataset", "split", "auroc", "auprc", "fpr95", "objective"]
        tables[every] = sorted(tuple(r.values()) for r in table.select(keep).to_pylist())
    assert tables[3] == tables[0]  # merging changes no row (same config + seed -> same numbers)


@pytest.mark.process
def test_rolling_compaction_on_a_bucket(s3_bucket):
    """The same merge on an S3-compatible server: the finished files become one object, the rest stay."""
    from densitune.results.store import RollingCompaction

    results = f"{s3_bucket}/run/results"
    rows = {}
    for i in range(4):
        rows[i] = [dict(experiment="a", trial_id=f"t{i}", stage="search", protocol="val-ood:v", backbone="cnn",
                        id_dataset="digits", loss="ce", D=8, spectral=True, density="gmm_sum", score="density",
                        eps=i / 100, seed=0, started_at=T0, ood_dataset="v", split="val", **provenance("cpu"),
                        auroc=0.5 + i / 20, auprc=0.6, fpr95=0.3)]
        write_rows(results, rows[i], name=f"t{i}")
    rolling = RollingCompaction(results, "a", every=3)
    for i in range(3):
        rolling.finished(f"t{i}")
    assert rolling.merged == 3 and rolling.pending == []
    names = sorted(f.name for f in result_files(results, "a"))
    assert names[0].startswith("compact-") and names[1:] == ["search-t3.parquet"]
    table = read_results(results)
    assert sorted(table.column("trial_id").to_pylist()) == ["t0", "t1", "t2", "t3"]
    assert sorted(table.column("auroc").to_pylist()) == [0.5 + i / 20 for i in range(4)]
