"""A run folder is untrusted input: planted compaction manifests hide no row and delete nothing.

Each case plants a ``_compact-*.json`` in a copy of a real run, then runs real ``densitune`` processes:
readers (``query``) still count every row and say in one warning line which manifest they ignored;
``compact`` deletes nothing the manifest names that does not verify, and nothing outside the run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from densitune.results.rows import provenance
from densitune.results.store import write_rows

pytestmark = pytest.mark.process

T0 = datetime(2026, 1, 1, tzinfo=UTC)
N_TRIALS, ROWS_PER_TRIAL = 6, 4


def _write_run(root: Path) -> None:
    for i in range(N_TRIALS):
        rows = [dict(experiment="a", trial_id=f"t{i}", stage="search", protocol="val-ood:v", backbone="cnn",
                     id_dataset="digits", loss="ce", D=8, spectral=True, density="gmm_sum", score="density",
                     eps=i / 100, seed=s, started_at=T0, ood_dataset=o, split=sp, **provenance("cpu"),
                     auroc=0.5 + i / 20 + s / 100, auprc=0.6, fpr95=0.3)
                for s in (0, 1) for o, sp in (("v", "val"), ("t", "test"))]
        write_rows(root / "results", rows, name=f"t{i}")


@pytest.fixture
def world(tmp_path):
    """A run, a victim file outside it (same format, so only a path check protects it), and a snapshot."""
    run = tmp_path / "run"
    _write_run(run)
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "search-victim.parquet"
    shutil.copy(next((run / "results" / "experiment=a").glob("search-*.parquet")), victim)
    return run, victim


def _densitune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _trial_files(run: Path) -> list[Path]:
    return sorted((run / "results" / "experiment=a").glob("search-*.parquet"))


def _plant(run: Path, victim: Path, case: str) -> None:
    folder = run / "results" / "experiment=a"
    files = _trial_files(run)
    fake_merged = folder / "compact-planted.parquet"
    if case == "dotdot":
        shutil.copy(files[0], fake_merged)
        info: object = {"merged": fake_merged.name, "replaces": [f"../../../outside/{victim.name}", files[1].name]}
    elif case == "absolute":
        shutil.copy(files[0], fake_merged)
        info = {"merged": fake_merged.name, "replaces": [str(victim), files[1].name]}
    elif case == "hides-most":  # the merged file holds one trial's rows, the manifest claims five
        shutil.copy(files[0], fake_merged)
        info = {"merged": fake_merged.name, "replaces": [f.name for f in files[:5]]}
    elif case == "wrong-counts":  # honest rows, dishonest counts
        pq.write_table(pq.read_table(files[0]), fake_merged)
        info = {"merged": fake_merged.name, "replaces": [{"name": files[0].name, "rows": 999}]}
    elif case == "merged-outside":
        info = {"merged": f"../../../outside/{victim.name}", "replaces": [f.name for f in files]}
    elif case == "deep-json":
        (folder / "_compact-planted.json").write_text("[" * 200_000)
        return
    elif case == "not-utf8":
        (folder / "_compact-planted.json").write_bytes(b"\xff\xfe{}")
        return
    else:
        raise AssertionError(case)
    (folder / "_compact-planted.json").write_text(json.dumps(info))


CASES = ["dotdot", "absolute", "hides-most", "wrong-counts", "merged-outside", "deep-json", "not-utf8"]


@pytest.mark.parametrize("case", CASES)
def test_a_planted_manifest_hides_no_row(world, case):
    run, victim = world
    _plant(run, victim, case)
    planted_rows = sum(pq.read_metadata(f).num_rows for f in (run / "results").rglob("compact-*.parquet"))
    p = _densitune("query", str(run), "SELECT count(*) AS n FROM results", "--format", "csv")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["n", str(N_TRIALS * ROWS_PER_TRIAL + planted_rows)]  # every row, none hidden
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "ignoring compaction manifest" in lines[0] and "_compact-planted.json" in lines[0]
    assert "Traceback" not in p.stderr


@pytest.mark.parametrize("case", CASES)
def test_compact_deletes_nothing_a_planted_manifest_names(world, case):
    run, victim = world
    _plant(run, victim, case)
    before = {f: f.read_bytes() for f in _trial_files(run)}
    victim_bytes = victim.read_bytes()
    p = _densitune("compact", str(run))
    assert p.returncode == 0, p.stderr
    assert "Traceback" not in p.stderr
    assert victim.read_bytes() == victim_bytes  # outside the run: untouched
    assert (run / "results" / "experiment=a" / "_compact-planted.json").exists()  # left for a person to look at
    # every trial's rows are still there, in the merged file or their own (none lost, none deleted unverified)
    q = _densitune("query", str(run), "SELECT count(*) AS n FROM results WHERE trial_id LIKE 't%'", "--format", "csv")
    assert q.returncode == 0, q.stderr
    assert int(q.stdout.split()[1]) >= N_TRIALS * ROWS_PER_TRIAL
    assert before  # the planted case had trial files to protect


def test_an_honest_interrupted_compaction_still_verifies(world):
    """The manifest densitune itself writes verifies silently: a compaction killed after publishing its merged
    file is finished by the next one, with no warning and every row once."""
    run, _ = world
    env = {**os.environ, "DENSITUNE_FAILPOINT": "compact:merged-published"}
    p = subprocess.run([sys.executable, "-m", "densitune", "compact", str(run)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert p.returncode == -9
    q = _densitune("query", str(run), "SELECT count(*) AS n FROM results", "--format", "csv")
    assert q.returncode == 0 and q.stdout.split() == ["n", str(N_TRIALS * ROWS_PER_TRIAL)] and q.stderr == ""
    manifest = json.loads(next((run / "results" / "experiment=a").glob("_compact-*.json")).read_text())
    assert [e["rows"] for e in manifest["replaces"]] == [ROWS_PER_TRIAL] * N_TRIALS
    c = _densitune("compact", str(run))  # (it takes over the killed compaction's lock, and says so)
    assert c.returncode == 0 and "manifest" not in c.stderr, c.stderr
    assert not list((run / "results").rglob("_compact-*")) and len(list((run / "results").rglob("*.parquet"))) == 1
    q = _densitune("query", str(run), "SELECT count(*) AS n FROM results", "--format", "csv")
    assert q.stdout.split() == ["n", str(N_TRIALS * ROWS_PER_TRIAL)]
