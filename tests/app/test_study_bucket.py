"""A study into a bucket: ``densitune run experiments/ip_mnist.yaml --smoke --out s3://bucket/run`` on a real
S3-compatible server (moto, its own process on loopback) trains, searches and reports like a run on a folder;
its report is in the bucket, and ``densitune report s3://bucket/run`` reads the same rows back (slow: real Ray
runs, about 2 minutes on 2 cores)."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import S3_SECRET

from densitune.app import studies as st

pytestmark = [pytest.mark.slow, pytest.mark.process]

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "experiments" / "ip_mnist.yaml"


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "densitune", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def test_a_study_runs_into_a_bucket_and_reads_back(tmp_path, s3_bucket, s3_server):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    tmp = tempfile.mkdtemp(prefix="sb", dir="/tmp")  # short: Ray's socket paths live under it
    env = {**os.environ, **s3_server.env, "TMPDIR": tmp, "RAY_TMPDIR": tmp}
    run = f"{s3_bucket}/run"
    p = _cli("run", str(SPEC), "--smoke", "--out", run, "--num-cpus", "2", env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr[-3000:]
    study = st.load_study(SPEC, smoke_run=True)
    for t in study.tables:  # the study table, printed
        assert f"{study.name} {t.id}:" in p.stdout
    assert f"study {study.label}: report in {run}/studies/{study.label}/report.md (and report.csv)" in p.stdout

    objects = s3_server.objects(s3_bucket.removeprefix("s3://"))
    prefix = f"run/studies/{study.label}/"
    report_md, report_csv = objects[prefix + "report.md"].decode(), objects[prefix + "report.csv"].decode()
    assert report_md.startswith(f"# {study.title}")
    assert f"{prefix}mnist/search.yaml" in objects  # the spec the part ran, as a record
    assert any(k.startswith(f"run/models/{st.TRAIN_EXPERIMENT}/") for k in objects)
    assert not any(k.startswith(f"run/studies/{study.label}/mnist/models") for k in objects)  # no model views
    assert not any(S3_SECRET.encode() in body for body in objects.values())
    assert list(cwd.iterdir()) == []  # nothing written in the working directory

    # The report's figures are the searched rows: every note figure has ours; each row's selected ε and
    # value are a test row that `densitune report` reads back from the bucket.
    rows = list(csv.DictReader(io.StringIO(report_csv)))
    assert len(rows) == sum(len(t.rows) * len(t.columns) for t in study.tables)
    assert all(0 <= float(r["ours"]) <= 1 for r in rows)
    from densitune.results.store import read_results

    searched = read_results(run + "/results", experiment=f"{study.label}-mnist", stage="search").to_pylist()
    assert len({r["trial_id"] for r in searched}) == 4  # 2 networks x ε in {0, 0.02}
    test_rows = [r for r in searched if r["split"] == "test"]
    for r in rows:
        ood = r["ood"].split(" (")[-1].rstrip(")") if " (" in r["ood"] else r["ood"]
        values = {round(x[r["metric"]], 4) for x in test_rows if x["ood_dataset"] == ood and f"{x['eps']:g}" == r["eps"]}
        assert round(float(r["ours"]), 4) in values, r

    # `densitune report` on the bucket: for each note table's network, its method summary (test AUROC %) shows
    # the study's own figures (one seed, one trial per method: the same rows, read back twice).
    start = 0
    for t in study.tables:
        n = len(t.rows) * len(t.columns)
        ours = {(r["method"], r["ood"]): float(r["ours"]) for r in rows[start:start + n] if r["metric"] == "auroc"}
        start += n
        assert {m for m, _ in ours} == {"gmm", "gmm+ip"}
        net = study.ours(t.part, t.network)
        q = _cli("report", run, "--where", f"D = {net.D}", env=env, cwd=cwd)
        assert q.returncode == 0, q.stderr[-3000:]
        summary = _first_table(q.stdout)
        assert {r["model"] for r in summary} == {f"cnn D={net.D} ce"}
        for method, label in (("gmm", "ddu"), ("gmm+ip", "ddu+ip")):
            shown = next(r for r in summary if r["method"] == label)
            for (m, ood), value in ours.items():
                if m == method:
                    column = next(c for c in shown if c.endswith(f": {ood.split(' (')[-1].rstrip(')')}"))
                    assert float(shown[column].strip("*").split(" ")[0]) == pytest.approx(100 * value, abs=0.011)


def _first_table(text: str) -> list[dict[str, str]]:
    """The first markdown table of ``text`` as one dict per row."""
    lines = text.splitlines()
    first = next(i for i, ln in enumerate(lines) if ln.startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    cells = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[first:end]]
    return [dict(zip(cells[0], row)) for row in cells[2:]]
