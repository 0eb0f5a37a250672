"""The default `densitune report RUN`: methods x OOD sets, AUROC and FPR95 as mean ± std, tidy csv / json.

Rows are written as real Parquet files; the expected cells are recomputed here with pandas from the
files, for the trials the design of the numbers makes the validation winners.
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest

from densitune.cli import main
from densitune.results.rows import provenance
from densitune.results.store import write_rows

T0 = datetime(2026, 1, 1, tzinfo=UTC)
TEST_SETS = ("digits-rot90", "noise-uniform", "digits-hflip")  # near, far, near (digits' registry groups)


def trial(root, trial_id, *, score, eps, val, test, density="", params="{}", seeds=(0, 1, 2), D=8, ensemble=False):
    """One search trial: a validation row and a row per test set for each seed (value + seed / 100)."""
    rows = []
    for s in ([None] if ensemble else seeds):
        off = 0.0 if s is None else s / 100
        common = dict(experiment="e", trial_id=trial_id, stage="search", protocol="val-ood:digits-blend", backbone="cnn",
                      id_dataset="digits", loss="ce", D=D, spectral=True, density=density, density_params=params,
                      score=score, eps=eps, seed=s, ensemble=ensemble, started_at=T0, id_accuracy=0.95,
                      checkpoints=[f"/m/{D}-{k}" for k in ((0, 1, 2) if ensemble else (s,))], **provenance("cpu"))
        rows.append({**common, "ood_dataset": "digits-blend", "split": "val", "auroc": val + off, "auprc": val,
                     "fpr95": 1 - val})
        for i, name in enumerate(TEST_SETS):
            a = test + i / 50 + off * (i + 1)
            rows.append({**common, "ood_dataset": name, "split": "test", "auroc": a, "auprc": a - 0.01,
                         "fpr95": (1 - a) * (1 + off)})
    write_rows(root, rows, name=trial_id)


@pytest.fixture
def run(tmp_path):
    res = tmp_path / "run" / "results"
    trial(res, "ddu0", score="density", density="gmm_sum", eps=0.0, val=0.80, test=0.70)
    trial(res, "ddu-ip", score="density", density="gmm_sum", eps=0.01, val=0.90, test=0.60)  # ip wins validation
    trial(res, "ddu-ip-test", score="density", density="gmm_sum", eps=0.05, val=0.85, test=0.99)  # best on test only
    trial(res, "ddu-D4", score="density", density="gmm_sum", eps=0.0, val=0.70, test=0.97, D=4)
    trial(res, "msp0", score="msp", eps=0.0, val=0.88, test=0.75)  # ε = 0 wins validation for msp
    trial(res, "msp-ip", score="msp", eps=0.02, val=0.86, test=0.80)
    trial(res, "kde", score="density", density="kde", params='{"bandwidth": 0.5}', eps=0.0, val=0.60, test=0.65)
    trial(res, "ens", score="ensemble_msp", eps=0.0, val=0.91, test=0.72, ensemble=True)
    return tmp_path / "run"


def _rows(run) -> pd.DataFrame:
    """The test rows straight from the Parquet files (no densitune reader)."""
    df = ds.dataset(run / "results", format="parquet", partitioning="hive").to_table().to_pandas()
    return df[df["split"] == "test"]


def _cell(rows: pd.DataFrame, trial_id: str, ood: str, metric: str) -> str:
    v = rows[(rows["trial_id"] == trial_id) & (rows["ood_dataset"] == ood)][metric]
    text = f"{100 * v.mean():.2f}"
    return text + (f" ± {100 * v.std(ddof=1):.2f}" if len(v) > 1 else "")


def _table(text: str, heading: str) -> pd.DataFrame:
    """The markdown table under the heading that starts with ``heading``, as strings."""
    block = text.split(f"### {heading}", 1)[1].split("\n\n", 2)[1]
    lines = [ln for ln in block.splitlines() if not set(ln) <= set("|:- ")]
    cells = [[c.strip() for c in ln.strip().strip("|").split("|")] for ln in lines]
    return pd.DataFrame(cells[1:], columns=cells[0]).set_index("method")


# trial chosen on validation per method row: (method, trial)
CHOSEN = {"ddu": "ddu0", "ddu+ip": "ddu-ip", "baseline (msp)": "msp0", "ensemble": "ens", "density:kde": "kde"}


def test_report_prints_methods_by_ood_sets_with_mean_and_std(run, capsys):
    assert main(["report", str(run)]) == 0
    text = capsys.readouterr().out
    rows = _rows(run)
    auroc, fpr = _table(text, "test AUROC"), _table(text, "test FPR95")
    # OOD sets grouped near, then far, as the digits' registry entry says
    sets = ["near: digits-hflip", "near: digits-rot90", "far: noise-uniform"]
    assert list(auroc.columns) == ["model", "ε", *sets] and list(fpr.columns) == sets
    assert set(auroc.index) == set(CHOSEN) and list(fpr.index) == list(auroc.index)
    for method, tid in CHOSEN.items():
        for col in sets:
            ood = col.split(": ")[1]
            assert auroc.at[method, col].strip("*") == _cell(rows, tid, ood, "auroc"), (method, col)
            assert fpr.at[method, col].strip("*") == _cell(rows, tid, ood, "fpr95"), (method, col)
    # what validation chose, said as it is: msp's ε search preferred ε = 0 (one row, no "+ip"); ddu's chose 0.01;
    # the D=4 and the test-best trials lose
    assert auroc.at["ddu", "ε"] == "0" and auroc.at["ddu+ip", "ε"] == "0.01 (tuned)"
    assert auroc.at["baseline (msp)", "ε"] == "0 (tuned)" and not any("msp)+ip" in m for m in auroc.index)
    assert auroc.at["ddu", "model"] == "cnn D=8 ce" and auroc.at["density:kde", "model"] == "cnn D=8 ce bandwidth=0.5"
    assert "0.05" not in set(auroc["ε"])
    # best per column in bold: the highest AUROC mean, the lowest FPR95 mean, computed from the rows
    for col in sets:
        ood = col.split(": ")[1]
        means = {m: rows[(rows["trial_id"] == t) & (rows["ood_dataset"] == ood)] for m, t in CHOSEN.items()}
        best_a = max(means, key=lambda m: means[m]["auroc"].mean())
        best_f = min(means, key=lambda m: means[m]["fpr95"].mean())
        assert auroc.at[best_a, col].startswith("**") and fpr.at[best_f, col].startswith("**")
        assert sum(v.startswith("**") for v in auroc[col]) == 1 and sum(v.startswith("**") for v in fpr[col]) == 1


def test_full_is_the_long_report(run, capsys):
    assert main(["report", str(run), "--full"]) == 0
    full = capsys.readouterr().out
    assert "### 1. cnn D=8 ce score=ensemble_msp" in full and "| ddu+ip |" in full
    assert main(["report", str(run), "--view", "all"]) == 0
    assert capsys.readouterr().out == full


def test_csv_and_json_are_tidy(run, capsys):
    rows = _rows(run)
    assert main(["report", str(run), "--format", "csv"]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert main(["report", str(run), "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    js = pd.DataFrame.from_records(records)
    # one row per method x test OOD set, no prose column
    assert len(csv) == len(js) == len(CHOSEN) * len(TEST_SETS)
    assert "table" not in csv.columns and "title" not in js.columns
    for frame in (csv, js):
        assert {"method", "ood_group", "ood_dataset", "eps", "auroc", "auroc_std", "fpr95", "fpr95_std", "n_seeds"} <= set(frame.columns)
        for r in frame.itertuples():
            got = rows[(rows["trial_id"] == CHOSEN[r.method]) & (rows["ood_dataset"] == r.ood_dataset)]
            assert r.auroc == pytest.approx(got["auroc"].mean(), abs=1e-12)
            assert r.fpr95 == pytest.approx(got["fpr95"].mean(), abs=1e-12)
            assert r.n_seeds == len(got)
            assert bool(r.eps_tuned) == (r.method in ("ddu+ip", "baseline (msp)"))  # ε chosen among several on val
            assert r.ood_group == {"noise-uniform": "far"}.get(r.ood_dataset, "near")
    # parameters: a nested object in json, one column per parameter in csv
    kde = [r for r in records if r["density"] == "kde"]
    assert kde and all(r["density_params"] == {"bandwidth": 0.5} for r in kde)
    assert csv.loc[csv["density"] == "kde", "density_params.bandwidth"].eq(0.5).all()
    ens = js[js["method"] == "ensemble"]
    assert ens["n_seeds"].eq(1).all() and ens["auroc_std"].isna().all()  # one ensemble value: no std
    assert np.isfinite(csv.loc[csv["method"] == "ddu", "auroc_std"]).all()


def test_full_csv_and_json_carry_keys_not_titles(run, capsys):
    assert main(["report", str(run), "--full", "--format", "csv"]) == 0
    csv = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert "table" not in csv.columns and {"backbone", "D", "method", "rank", "score", "eps_ip"} <= set(csv.columns)
    assert main(["report", str(run), "--view", "configs", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert all(isinstance(r["density_params"], dict) for r in records)
    assert main(["best", str(run), "--json"]) == 0
    best = json.loads(capsys.readouterr().out)
    assert best["trial_id"] == "ens" and best["density_params"] == {}


def test_latex_summary_through_pandas(run, capsys):
    assert main(["report", str(run), "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert out.count(r"\begin{tabular}") == 2 and r"\textbf{" in out and r"$\pm$" in out and "**" not in out
