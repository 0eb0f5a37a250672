"""The results store: schema, atomic writes, and clear errors on foreign or corrupt files."""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from densitune.errors import ResultsError
from densitune.results.rows import provenance
from densitune.results.store import COLUMNS, SCHEMA, SCHEMA_VERSION, code_version, read_results, write_rows


def row(**kw):
    base = dict(experiment="e", trial_id="t1", stage="search", started_at=datetime(2026, 1, 1, tzinfo=UTC),
                ood_dataset="noise", split="test", auroc=0.9, eps=0.0, seed=0, D=8, **provenance("cpu"))
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


@pytest.mark.process
def test_code_version_names_the_commit():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
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
            "density", "eps", "seed", "auroc", "auprc", "fpr95", "id_accuracy", "checkpoints", "started_at",
            "duration_s", "code_version", "protocol", "score"}
    assert need <= set(COLUMNS)


V3_RESULTS = Path(__file__).parents[1] / "data" / "results_v3"  # written by the schema v3 code (densitune 0.1.0)


def test_v3_results_still_read_as_v4(tmp_path):
    t = read_results(V3_RESULTS)
    assert t.schema.equals(SCHEMA) and t.num_rows == 5
    rows = {(r["trial_id"], r["ood_dataset"], r["seed"]): r for r in t.to_pylist()}
    ce = rows[("cnn-D8-ce-sn3-s0", None, 0)]
    assert ce["schema_version"] == 3 and ce["center_loss"] is None and ce["checkpoints"] is None
    assert rows[("cnn-D8-contrastive-lam0.1-sn3-s0", None, 0)]["center_loss"] == 0.1
    ens = rows[("p-2", "digits-rot90", None)]
    assert ens["ensemble"] is True and ens["checkpoints"] == ["/runs/m/s0", "/runs/m/s1"]
    single = rows[("p-1", "digits-blend", 0)]
    assert single["ensemble"] is False and single["checkpoints"] == ["/runs/m/s0"] and single["node"] is None
    # v3 and v4 files side by side read as one table
    mixed = tmp_path / "mixed"
    shutil.copytree(V3_RESULTS, mixed)
    write_rows(mixed, [row(experiment="v3", trial_id="new", checkpoints=["/m/a"], ensemble=False)], name="new")
    both = read_results(mixed, experiment="v3")
    assert both.num_rows == 6 and sorted(set(both.column("schema_version").to_pylist())) == [3, SCHEMA_VERSION]


def test_other_versions_are_named(tmp_path):
    table = pq.read_table(next(V3_RESULTS.rglob("*.parquet")))
    f = tmp_path / "experiment=old" / "search-x.parquet"
    f.parent.mkdir()
    pq.write_table(table.set_column(0, "schema_version", pa.array([2] * table.num_rows, pa.int32())), f)
    with pytest.raises(ResultsError, match="has results schema v2; this densitune reads v3, v4, v5, v6, v7"):
        read_results(tmp_path)


def test_v4_results_read_with_the_v5_columns_null(tmp_path):
    from densitune.results.store import SCHEMA_V4, V5_COLUMNS, V6_COLUMNS, V7_COLUMNS

    write_rows(tmp_path, [row(experiment="e", trial_id="new", checkpoints=["/m/a"], ensemble=False)], name="new")
    current = pq.read_table(next(tmp_path.rglob("*.parquet")))
    old = current.drop_columns([*V5_COLUMNS, *V6_COLUMNS, *V7_COLUMNS]).set_column(0, "schema_version", pa.array([4], pa.int32())).cast(SCHEMA_V4)
    f = tmp_path / "experiment=e" / "search-old.parquet"
    pq.write_table(old, f)
    t = read_results(tmp_path)
    assert t.schema.equals(SCHEMA) and t.num_rows == 2
    by_version = {r["schema_version"]: r for r in t.to_pylist()}
    assert set(by_version) == {4, SCHEMA_VERSION}
    assert all(by_version[4][c] is None for c in V5_COLUMNS) and by_version[SCHEMA_VERSION]["cpu_capability"]
    skip = (*V5_COLUMNS, *V6_COLUMNS, *V7_COLUMNS, "schema_version", "trial_id")
    assert {k: v for k, v in by_version[4].items() if k not in skip} == \
        {k: v for k, v in by_version[SCHEMA_VERSION].items() if k not in skip}


def test_provenance_records_the_kernels():
    p = provenance("cpu")
    assert p["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and p["cpu"]
    assert p["onednn_isa"] == os.environ.get("ONEDNN_MAX_CPU_ISA", "ALL") and p["cuda"] is None
    assert p["deterministic"] is torch.are_deterministic_algorithms_enabled() and p["reproducible"] is False


def test_provenance_fills_every_v4_column():
    p = provenance("cpu", data_checksums={"digits/val": "abc"})
    assert p["device"] == "cpu" and p["dtype"] == "float32" and p["autocast"] is False and p["compile"] is False
    assert p["torch_version"] == torch.__version__
    # the host name, or the Ray node id when this process runs a Ray (the session fixture of other tests)
    ray = sys.modules.get("ray")
    assert p["node"] == (f"ray:{ray.get_runtime_context().get_node_id()}" if ray is not None and ray.is_initialized()
                         else platform.node())
    assert json.loads(p["data_checksums"]) == {"digits/val": "abc"}
    assert p["densitune_version"] and p["code_version"].startswith("densitune ")


def test_v5_results_get_the_set_kind_and_short_name_a_v6_search_records(tmp_path):
    """Schema v6 adds `ood_kind` / `ood_name`; a v5 file's rows get them as a search would record them now:
    the built-in table's kind, a folder's own name (unique) of kind unknown, "attack" for adversarial rows."""
    from densitune.results.store import SCHEMA_V5, V6_COLUMNS, V7_COLUMNS

    sets = ["digits-rot90", "noise-uniform", "folder:/data/a/scans", "folder:/data/b/scans", "adv-fgsm", None]
    write_rows(tmp_path, [row(trial_id="t", id_dataset="digits", ood_dataset=s) for s in sets], name="t")
    current = pq.read_table(next(tmp_path.rglob("*.parquet")))
    n = current.num_rows
    old = current.drop_columns([*V6_COLUMNS, *V7_COLUMNS]).set_column(0, "schema_version", pa.array([5] * n, pa.int32())).cast(SCHEMA_V5)
    pq.write_table(old, next(tmp_path.rglob("*.parquet")))
    t = read_results(tmp_path)
    assert t.schema.equals(SCHEMA) and set(t.column("schema_version").to_pylist()) == {5}
    got = {r["ood_dataset"]: (r["ood_kind"], r["ood_name"]) for r in t.to_pylist()}
    assert got == {"digits-rot90": ("near", "digits-rot90"), "noise-uniform": ("far", "noise-uniform"),
                   "folder:/data/a/scans": ("unknown", "scans"), "folder:/data/b/scans": ("unknown", "scans-2"),
                   "adv-fgsm": ("attack", "adv-fgsm"), None: (None, None)}


def test_v6_results_read_with_the_v7_tune_columns_null(tmp_path):
    """Schema v7 adds the tune columns; a v6 file's rows read with them null, every other value unchanged."""
    from densitune.results.store import SCHEMA_V6, V7_COLUMNS

    write_rows(tmp_path, [row(experiment="e", trial_id="new", checkpoints=["/m/a"], ensemble=False)], name="new")
    current = pq.read_table(next(tmp_path.rglob("*.parquet")))
    old = current.drop_columns(list(V7_COLUMNS)).set_column(0, "schema_version", pa.array([6], pa.int32())).cast(SCHEMA_V6)
    pq.write_table(old, tmp_path / "experiment=e" / "search-old.parquet")
    t = read_results(tmp_path)
    assert t.schema.equals(SCHEMA) and t.num_rows == 2
    by_version = {r["schema_version"]: r for r in t.to_pylist()}
    assert set(by_version) == {6, SCHEMA_VERSION} == {6, 7}
    assert all(by_version[6][c] is None for c in V7_COLUMNS)
    skip = ("schema_version", "trial_id")
    assert {k: v for k, v in by_version[6].items() if k not in skip} == \
        {k: v for k, v in by_version[SCHEMA_VERSION].items() if k not in skip}
