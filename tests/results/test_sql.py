"""``--where`` can only filter and ``query`` can only read: real DuckDB, real Parquet, real CLI processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from densitune.errors import ResultsError
from densitune.results.rows import provenance
from densitune.results.sql import check_filter, echo
from densitune.results.store import filter_results, query, read_results, write_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def write_trial(root: Path, trial: str, *, density: str, val: float, test: float, ood: str = "v") -> None:
    common = dict(experiment="e", trial_id=trial, stage="search", protocol="val-ood:v", backbone="cnn",
                  id_dataset="digits", loss="ce", D=8, spectral=True, density=density, score="density",
                  eps=0.0, seed=0, started_at=T0, **provenance("cpu"))
    rows = [{**common, "ood_dataset": ood, "split": "val", "auroc": val, "auprc": val, "fpr95": 1 - val, "objective": val},
            {**common, "ood_dataset": "union", "split": "test", "auroc": test, "auprc": test, "fpr95": 1 - test}]
    write_rows(root, rows, name=trial)


@pytest.fixture
def results(tmp_path) -> Path:
    root = tmp_path / "results"
    write_trial(root, "a", density="kde", val=0.95, test=0.70)
    write_trial(root, "b", density="gmm_sum", val=0.91, test=0.80)
    write_trial(root, "c", density="kde", val=0.85, test=0.90)
    return root


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def densitune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_filters_that_work(results):
    table = read_results(results)
    union = filter_results(table, "ood_dataset = 'union'")
    assert union.num_rows == 3 and set(union.column("split").to_pylist()) == {"test"}
    picked = filter_results(table, "auroc > 0.9 AND density IN ('kde')")
    assert sorted(zip(picked.column("trial_id").to_pylist(), picked.column("auroc").to_pylist())) == [("a", 0.95)]
    # functions, casts, CASE, BETWEEN and comments are plain expressions
    assert filter_results(table, "lower(density) LIKE 'gmm%' -- comment").num_rows == 2
    assert filter_results(table, "CAST(D AS DOUBLE) BETWEEN 7.5 AND 8.5 AND (CASE WHEN split = 'val' THEN true END)").num_rows == 3


ESCAPES = {
    "semicolon + COPY": "1=1; COPY results TO '{out}/leak.csv'",
    "UNION": "1=1 UNION ALL SELECT * FROM results",
    "COPY": "COPY results TO '{out}/leak.csv'",
    "ATTACH": "ATTACH '{out}/x.db'",
    "parenthesis escape": "1=1) UNION ALL SELECT * FROM results WHERE (1=1",
    "parenthesis escape, second form": "1=1) OR (1=1",
    "IN subquery": "trial_id IN (SELECT trial_id FROM results)",
    "scalar subquery": "auroc > (SELECT min(auroc) FROM results)",
    "EXISTS": "EXISTS (SELECT 1)",
    "file read": "(SELECT count(*) FROM read_csv('/etc/passwd')) > 0",
    "file read as a function": "read_text('/etc/passwd') IS NOT NULL",
    "window": "row_number() OVER () > 0",
    "config change": "1=1; SET enable_external_access = true",
}


@pytest.mark.process
@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_where_escapes_are_refused_one_line_results_unchanged(case, results, tmp_path):
    where = ESCAPES[case].format(out=tmp_path)
    before = snapshot(tmp_path)
    p = densitune("report", str(results), "--where", where, cwd=tmp_path)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("densitune: error: bad --where"), p.stderr
    assert "Traceback" not in p.stderr and p.stdout == ""
    assert snapshot(tmp_path) == before  # no file written, none changed


@pytest.mark.process
def test_where_works_through_the_cli(results, tmp_path):
    p = densitune("best", str(results), "--where", "auroc > 0.9 AND density IN ('kde')", "--json", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["trial_id"] == "a"
    # the union rows are the test rows: selecting needs validation rows, so `best` says so in one line
    p = densitune("best", str(results), "--where", "ood_dataset = 'union'", cwd=tmp_path)
    assert p.returncode == 2 and "no validation rows" in p.stderr
    p = densitune("report", str(results), "--where", "ood_dataset = 'union' OR split = 'val'", "--format", "csv", cwd=tmp_path)
    assert p.returncode == 0 and "union" in p.stdout, p.stderr


def test_refused_filter_leaves_the_mean_unchanged(results):
    """The hole the issue reproduced: a UNION doubled the rows and moved the reported mean."""
    table = read_results(results)
    with pytest.raises(ResultsError):
        filter_results(table, "1=1 UNION ALL SELECT * FROM results")
    assert filter_results(table, "1=1").num_rows == table.num_rows == 6


def test_check_filter_names_the_problem():
    with pytest.raises(ResultsError, match="a subquery is not allowed"):
        check_filter("D IN (SELECT 1)")
    with pytest.raises(ResultsError, match="not one SQL expression"):
        check_filter("1=1; SELECT 1")
    with pytest.raises(ResultsError, match="empty filter"):
        check_filter("  ")


def test_echo_caps_user_text():
    long = "x" * 5000
    assert len(echo(long)) <= 203 and "\n" not in echo("a\nb")


def test_query_is_one_select_read_only(results, tmp_path):
    table = read_results(results)
    assert query(table, "SELECT count(*) AS n FROM results").column("n").to_pylist() == [6]
    for sql, fragment in (
        (f"COPY results TO '{tmp_path}/leak.csv'", "only a SELECT"),
        (f"ATTACH '{tmp_path}/x.db'", "only a SELECT"),
        ("SELECT 1; SELECT 2", "exactly one SELECT"),
        ("SET enable_external_access = true", "only a SELECT"),
        ("SELECT * FROM read_csv('/etc/passwd')", "--allow-files"),
        (f"SELECT * FROM read_parquet('{results}/**/*.parquet')", "--allow-files"),
    ):
        with pytest.raises(ResultsError, match=fragment):
            query(table, sql)
    assert not list(tmp_path.glob("leak*")) and not (tmp_path / "x.db").exists()


@pytest.mark.process
def test_query_allow_files_reads_files(results, tmp_path):
    csv = tmp_path / "extra.csv"
    csv.write_text("k,v\n1,2\n3,4\n")
    p = densitune("query", str(results), f"SELECT sum(v) AS s FROM read_csv('{csv}')", "--format", "csv", cwd=tmp_path)
    assert p.returncode == 2 and "--allow-files" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    p = densitune("query", str(results), f"SELECT sum(v) AS s FROM read_csv('{csv}')", "--allow-files", "--format", "csv",
                  cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1].split(",")[0] == "6"
    # still one SELECT: no writing with --allow-files either
    p = densitune("query", str(results), f"COPY results TO '{tmp_path}/leak.csv'", "--allow-files", cwd=tmp_path)
    assert p.returncode == 2 and not (tmp_path / "leak.csv").exists()
