"""The results store: schema, atomic writes, and clear errors on foreign or corrupt files."""

from __future__ import annotations

from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from densitune.errors import ResultsError
from densitune.search.results.store import COLUMNS, SCHEMA, SCHEMA_VERSION, code_version, read_results, write_rows


def row(**kw):
    base = dict(experiment="e", trial_id="t1", stage="search", code_version=code_version(),
                started_at=datetime(2026, 1, 1, tzinfo=UTC), ood_dataset="noise", split="test",
                auroc=0.9, eps=0.0, seed=0, D=8)
    return {**base, **kw}


def test_round_trip(tmp_path):
    rows = [row(ood_dataset=f"set{i}", auroc=i / 10) for i in range(3)]
    path = write_rows(tmp_path, rows, name="t1")
    assert path.parent.name == "experiment=e" and path.name == "search-t1.parquet"
    t = pq.read_table(path)
    assert t.schema.equals(SCHEMA)
    got = read_results(tmp_path)
    assert got.num_rows == 3
    assert got.column("auroc").to_pylist() == [0.0, 0.1, 0.2]
    assert set(got.column("schema_version").to_pylist()) == {SCHEMA_VERSION}
    assert not list(tmp_path.rglob(".tmp-*"))  # nothing half-written left behind


def test_same_name_replaces_not_duplicates(tmp_path):
    write_rows(tmp_path, [row(auroc=0.1)], name="t1")
    write_rows(tmp_path, [row(auroc=0.2)], name="t1")
    got = read_results(tmp_path)
    assert got.num_rows == 1 and got.column("auroc").to_pylist() == [0.2]


def test_rows_are_checked_against_schema(tmp_path):
    with pytest.raises(ValueError, match="outside the schema"):
        write_rows(tmp_path, [row(bogus=1)])
    with pytest.raises(ValueError, match="required"):
        write_rows(tmp_path, [row(code_version=None)])
    assert not any(tmp_path.rglob("*.parquet"))


def test_code_version_names_the_commit():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short=10", "HEAD"], capture_output=True, text=True)
    if sha.returncode != 0:
        pytest.skip("not a git checkout")
    assert code_version().startswith("densitune ") and f"+g{sha.stdout.strip()}" in code_version()


def test_missing_dir_and_bad_files(tmp_path):
    with pytest.raises(ResultsError, match="not found"):
        read_results(tmp_path / "nope")
    good = write_rows(tmp_path, [row()], name="ok")
    # a partially written temp file is ignored (hidden)
    (good.parent / ".tmp-search-x.parquet").write_bytes(b"PAR1 partial")
    assert read_results(tmp_path).num_rows == 1
    bad = good.parent / "search-bad.parquet"
    bad.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ResultsError, match="corrupt Parquet file .*search-bad.parquet"):
        read_results(tmp_path)
    bad.unlink()
    foreign = good.parent / "other.parquet"
    pq.write_table(pa.table({"x": [1, 2]}), foreign)
    with pytest.raises(ResultsError, match="foreign Parquet file .*other.parquet"):
        read_results(tmp_path)
    foreign.unlink()
    (good.parent / "notes.txt").write_text("hi")
    with pytest.raises(ResultsError, match="foreign file .*notes.txt"):
        read_results(tmp_path)


def test_columns_cover_the_issue_list():
    need = {"experiment", "trial_id", "stage", "backbone", "id_dataset", "ood_dataset", "split", "loss", "D",
            "density", "eps", "seed", "auroc", "auprc", "fpr95", "id_accuracy", "checkpoint", "started_at",
            "duration_s", "code_version", "protocol", "score"}
    assert need <= set(COLUMNS)
