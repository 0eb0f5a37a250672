"""The readers load only the columns and rows a command needs, and get the same answers as a whole-table read."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from densitune.cli import main
from densitune.errors import ResultsError
from densitune.results import store
from densitune.results.rows import provenance
from densitune.results.sql import referenced_columns
from densitune.results.store import COLUMNS, SCHEMA, read_results, write_rows
from densitune.search.report.tables import READ_COLUMNS, read_search_rows

V3_RESULTS = Path(__file__).parents[1] / "data" / "results_v3"


def _results(tmp_path: Path, trials: int = 30) -> Path:
    """v3 files beside ``trials`` v4 search trials (2 seeds x val + 2 test rows) and 3 training epochs."""
    root = tmp_path / "results"
    shutil.copytree(V3_RESULTS, root)
    common = dict(stage="search", protocol="val-ood:blend", backbone="cnn", loss="ce", D=8, spectral=True,
                  started_at=datetime(2026, 1, 1, tzinfo=UTC), search_seed=0, ensemble=False, objective=0.5,
                  **provenance("cpu"))
    for i in range(trials):
        rows = [dict(common, experiment="s", trial_id=f"t{i}", score="density", density=["gmm_sum", "kde"][i % 2],
                     density_params="{}", eps=(i % 3) / 100, seed=seed, checkpoints=[f"/m/s{seed}"], ood_dataset=ood,
                     split=split, auroc=0.5 + (i * 7 % 13) / 30 + seed / 100, auprc=0.6, fpr95=0.3, id_accuracy=0.9)
                for seed in (0, 1) for ood, split in (("blend", "val"), ("rot", "test"), ("noise", "test"))]
        write_rows(root, rows, name=f"p-{i}")
    for e in range(3):
        write_rows(root, [dict(common, experiment="t", trial_id="net", stage="train", epoch=e, train_loss=1.0)], name=f"e{e}")
    return root


def test_pruned_reads_equal_the_whole_table(tmp_path, monkeypatch):
    root = _results(tmp_path)
    monkeypatch.setattr(store, "_READ_BATCH", 7)  # several batches, v3 files in some of them
    whole = read_results(root)
    assert whole.schema.equals(SCHEMA) and whole.num_rows == 5 + 30 * 6 + 3
    # the reference: every file read whole by pyarrow (v4) plus the upgraded v3 files
    v4 = [str(f) for f in store.result_files(root) if "experiment=v3" not in str(f)]
    ref = ds.dataset(v4, schema=SCHEMA, format="parquet").to_table()
    assert whole.slice(0, ref.num_rows).equals(ref)
    cols = ["auroc", "trial_id", "split"]
    search = read_results(root, stage="search", columns=cols)
    assert search.column_names == ["trial_id", "split", "auroc"]  # SCHEMA order
    assert search.equals(whole.filter(ds.field("stage") == "search").select(search.column_names))
    assert read_results(root, experiment="s", columns=["auroc"]).num_rows == 180
    with pytest.raises(ResultsError, match="no such result column"):
        read_results(root, columns=["nope"])


def test_a_foreign_file_is_named_by_a_pruned_read(tmp_path):
    root = _results(tmp_path, trials=3)
    good = next((root / "experiment=s").glob("*.parquet"))
    table = pq.read_table(good)
    pq.write_table(table.drop_columns(["node"]), root / "experiment=s" / "search-foreign.parquet")
    with pytest.raises(ResultsError, match="foreign Parquet file .*search-foreign.parquet"):
        read_results(root, columns=["auroc"])


def test_referenced_columns():
    assert referenced_columns("SELECT count(*) FROM results", COLUMNS) == set()
    assert referenced_columns("SELECT Density, max(r.auroc) FROM results r WHERE split = 'val' GROUP BY ALL",
                              COLUMNS) == {"density", "auroc", "split"}
    assert referenced_columns("SELECT * FROM results", COLUMNS) is None
    assert referenced_columns("SELECT COLUMNS('au.*') FROM results", COLUMNS) is None
    assert referenced_columns("D >= 16 AND lower(loss) = 'ce'", COLUMNS, expression=True) == {"D", "loss"}


@pytest.mark.parametrize("argv", [
    ["report"], ["report", "--view", "configs", "--top", "3"], ["report", "--by", "density"],
    ["report", "--where", "density = 'kde' AND n_id IS NULL"], ["best"], ["best", "--json"],
    ["best", "--metric", "fpr95"],
    ["query", "SELECT count(*) FROM results"],
    ["query", "SELECT a.trial_id, count(*) n FROM results a JOIN results b USING (trial_id) GROUP BY 1 ORDER BY 1 LIMIT 3"],
])
def test_commands_print_what_a_whole_table_read_prints(tmp_path, monkeypatch, capsys, argv):
    root = _results(tmp_path)
    assert main([argv[0], str(root), *argv[1:]]) == 0
    pruned = capsys.readouterr().out
    whole = read_results(root)
    monkeypatch.setattr(store, "read_results", lambda *a, **k: whole)  # every column of every row
    import densitune.search.report.tables as report

    monkeypatch.setattr(report, "read_search_rows",
                        lambda d, where=None, by=None: store.filter_results(whole, where))
    assert main([argv[0], str(root), *argv[1:]]) == 0
    assert capsys.readouterr().out == pruned


def test_report_rows_hold_only_the_needed_columns(tmp_path):
    root = _results(tmp_path, trials=3)
    t = read_search_rows(root, "n_id IS NULL", by=["search_seed", "unknown"])
    assert set(t.column_names) == set(READ_COLUMNS) | {"n_id", "search_seed"}
    assert set(t.column("stage").to_pylist()) == {"search"}


def _v4_only(tmp_path: Path, trials: int = 40) -> Path:
    root = _results(tmp_path, trials)
    shutil.rmtree(root / "experiment=v3")
    return root


@pytest.mark.parametrize("stage,cols", [(None, list(COLUMNS)), ("search", ["schema_version", "stage", "trial_id", "auroc"]),
                                        ("train", ["schema_version", "stage", "epoch"])])
def test_the_one_pass_read_equals_the_file_by_file_read(tmp_path, monkeypatch, stage, cols):
    root = _v4_only(tmp_path)
    monkeypatch.setattr(store, "_SCAN_GROUP", 7)  # several scans, each with its own footer cache
    files = store.result_files(root)
    one_pass = store._read_current(files, cols, stage)
    assert one_pass is not None  # every file is current: DuckDB's multi-file scan reads them
    each = store._read_each(files, cols, stage)
    assert one_pass.schema.equals(each.schema) and one_pass.equals(each)  # same rows, types and order
    assert one_pass.num_rows == {None: 40 * 6 + 3, "search": 240, "train": 3}[stage]


@pytest.mark.parametrize("damage", ["drop-node", "string-auroc", "truncated", "v3-rows", "extra-column"])
def test_the_one_pass_read_refuses_any_file_that_is_not_current(tmp_path, monkeypatch, damage):
    root = _v4_only(tmp_path, trials=5)
    monkeypatch.setattr(store, "_SCAN_GROUP", 3)  # the bad file in a later scan than the first
    good = sorted((root / "experiment=s").glob("*.parquet"))[2]
    table = pq.read_table(good)
    bad = root / "experiment=s" / "search-zz.parquet"
    read = ["schema_version", "node", "auroc"]
    if damage == "drop-node":
        pq.write_table(table.drop_columns(["node"]), bad)
    elif damage == "string-auroc":
        i = table.schema.get_field_index("auroc")
        pq.write_table(table.set_column(i, "auroc", pa.array(["high"] * table.num_rows)), bad)
    elif damage == "truncated":
        bad.write_bytes(good.read_bytes()[:-100])
    elif damage == "v3-rows":  # the current columns, but rows that say another schema version wrote them
        pq.write_table(table.set_column(0, "schema_version", pa.array([3] * table.num_rows, pa.int32())), bad)
    else:  # a column no reader asks for: read as the file's other columns say
        pq.write_table(table.append_column("extra", table.column("auroc")), bad)
        assert store._read_current(store.result_files(root), read, None).num_rows == 5 * 6 + 3 + 6
        with pytest.raises(ResultsError, match="search-zz.parquet"):  # the full check of the file-by-file read
            store._read_each(store.result_files(root), read, None)
        return
    assert store._read_current(store.result_files(root), read, None) is None
    if damage == "v3-rows":  # the file-by-file read takes the current columns at their word, as before
        assert read_results(root, columns=["auroc"]).num_rows == 5 * 6 + 3 + 6
        return
    with pytest.raises(ResultsError, match="search-zz.parquet"):  # the file-by-file read names it
        read_results(root, columns=["node", "auroc"])


def test_the_first_file_is_checked_whole(tmp_path):
    """DuckDB binds the columns from the first file: a foreign first file sends the read file by file."""
    root = _v4_only(tmp_path, trials=3)
    first = store.result_files(root)[0]
    pq.write_table(pq.read_table(first).append_column("extra", pa.array([1] * pq.read_metadata(first).num_rows)), first)
    assert store._read_current(store.result_files(root), ["schema_version", "auroc"], None) is None
    with pytest.raises(ResultsError, match=f"foreign Parquet file .*{first.name}"):
        read_results(root, columns=["auroc"])


@pytest.mark.process
@pytest.mark.parametrize("argv", [["report"], ["best"], ["query", "SELECT count(*) AS n FROM results"]])
def test_reading_commands_import_no_torch_and_print_nothing_on_stderr(tmp_path, argv):
    """report / best / query read Parquet and render tables: torch (650 MB, seconds to import) and Ray stay
    out of the process, and DuckDB's own progress bar stays off (the console has one progress display)."""
    import subprocess
    import sys

    root = _v4_only(tmp_path, trials=3)
    args = [argv[0], str(root), *argv[1:]]
    code = ("import sys; from densitune.cli import main; rc = main(" + repr(args) + "); "
            "print('IMPORTED', sorted(m for m in ('torch', 'ray', 'torchvision') if m in sys.modules)); sys.exit(rc)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "IMPORTED []"
    assert p.stderr == ""


def test_query_markdown_without_pandas_equals_the_report_renderer():
    """``query``'s markdown (pyarrow only) is what the pandas renderer of the report prints for the same table."""
    from densitune.search.report.markdown import arrow_markdown
    from densitune.search.report.tables import Table, _markdown

    t = pa.table({"density": ["kde", None, "gmm_sum"], "D": pa.array([8, 32, 8], pa.int32()), "eps": [0.0, 0.0125, None],
                  "auroc": [0.91234567, None, 0.5], "auroc_std": [0.01, 0.002, None], "n": pa.array([3, 4, 5], pa.int64()),
                  "spectral": [True, False, True]})
    assert arrow_markdown("SELECT x", t) == _markdown(Table("SELECT x", t.to_pandas()))
    assert arrow_markdown("SELECT x", t).splitlines()[4] == "| kde | 8 | 0 | 0.9123 ± 0.0100 | 3 | True |"
    empty = t.slice(0, 0)
    assert arrow_markdown("e", empty) == _markdown(Table("e", empty.to_pandas()))
