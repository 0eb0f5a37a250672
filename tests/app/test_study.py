"""`densitune run`: the research note's tables as study specs (experiments/*.yaml), their plan and smoke runs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from densitune.app import studies as st

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "experiments").glob("*.yaml"))
METHOD_COMPARISON = ROOT / "experiments" / "method_comparison.yaml"


def _densitune(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_TMPDIR": os.environ.get("RAY_TMPDIR", "/tmp/rt-study")}
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def test_one_spec_per_table_of_the_note():
    names = {p.stem for p in SPECS}
    assert names == {"gradnorm_ip", "ip_cifar10", "ip_mnist", "method_comparison", "gmm_vs_kde", "diff_score",
                     "dim_sweep", "adversarial", "center_loss"}
    tables = {t.id for p in SPECS for t in st.load_study(p).tables}
    assert {f"table {n}" for n in (1, 2, 3, 4, 5, 6, 8, 9, *range(10, 20))} <= tables


def test_specs_carry_the_notes_figures():
    """The headline figures (METHODS.md: CIFAR-10 ResNet50 D=2048) appear exactly, with the right method and set."""
    s = st.load_study(ROOT / "experiments" / "dim_sweep.yaml")
    t16 = next(t for t in s.tables if t.id == "table 16")
    auroc = {(m, ood): v[0] for m, ood, v in t16.rows}
    assert [auroc["gmm", o] for o in ("svhn", "lsun", "cifar100", "mnist")] == [0.9480, 0.9365, 0.9068, 0.9774]
    assert [auroc["gmm+ip", o] for o in ("svhn", "lsun", "cifar100", "mnist")] == [0.9735, 0.9671, 0.9171, 0.9939]
    assert t16.accuracy == 0.9489 and t16.network == st.Network("resnet50", 2048, "ce")
    # every study: each note row has a figure per column, each in [0, 1]
    for p in SPECS:
        for t in st.load_study(p).tables:
            assert t.rows and all(len(v) == len(t.columns) and all(0 < x <= 1 for x in v) for _, _, v in t.rows)


@pytest.mark.process
def test_plan_prints_networks_trials_and_gpu_hours_without_running(tmp_path):
    out = tmp_path / "run"
    p = _densitune("run", str(METHOD_COMPARISON), "--plan", "--out", str(out), cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    line = next(x for x in p.stdout.splitlines() if x.startswith("method-comparison"))
    _, networks, to_train, trials, train_h, search_h, total = line.split()
    # one network x 5 seeds; 3 scores (msp, ensemble_msp, density) x 7 eps values
    assert (int(networks), int(to_train), int(trials)) == (5, 5, 21)
    # 5 networks x 200 epochs x (50,000 training + a third of 5,000 validation images) / ResNet-50's AMP img/s
    expected = 5 * 200 * (50000 + 5000 / 3) / st.TRAIN["resnet50"].amp / 3600
    assert float(train_h) == pytest.approx(expected, abs=0.006)
    assert 0 < float(search_h) < float(train_h) and float(total) == pytest.approx(float(train_h) + float(search_h), abs=0.011)
    assert "NVIDIA H200" in p.stdout and "GPU-h" in p.stdout
    assert not out.exists()  # nothing written, nothing started


BAD_SPECS = {
    "unknown-key": ("study: x\nparts: []\nmethods: {}\ntables: []\ncolour: red\n", "unknown key(s) colour"),
    "search-typo": (METHOD_COMPARISON.read_text().replace("densities:", "densitis:"), "did you mean 'densities'"),
    "bad-figure": (METHOD_COMPARISON.read_text().replace("[ddu, svhn, 0.9480, 0.9613]", "[ddu, svhn, high, 0.9613]"),
                   "tables[0].rows[11]"),
    "unknown-method": (METHOD_COMPARISON.read_text().replace("[ddu, svhn,", "[dduu, svhn,"), "unknown method 'dduu'"),
    "unknown-backbone": (METHOD_COMPARISON.read_text().replace("backbone: resnet50", "backbone: resnet5O"), "resnet5O"),
    "foreign-network": (METHOD_COMPARISON.read_text().replace("network: {backbone: resnet50, D: 2048",
                                                              "network: {backbone: resnet50, D: 1024"),
                        "tables[0].network: must be one network of part 'c10'"),
    "alias": ("study: &a x\nparts: *a\n", "aliases"),
    "negative-eps": (METHOD_COMPARISON.read_text().replace("eps_grid: [0,", "eps_grid: [-1,"), "eps"),
}


@pytest.mark.process
@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_is_one_line_exit_2_and_nothing_written(tmp_path, case):
    text, needle = BAD_SPECS[case]
    spec = tmp_path / "bad.yaml"
    spec.write_text(text)
    out = tmp_path / "run"
    p = _densitune("run", str(spec), "--out", str(out), "--smoke", cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("densitune: error: ") and needle in lines[0], p.stderr
    assert not out.exists()


@pytest.mark.process
def test_missing_data_names_the_expected_layout(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    out = tmp_path / "run"
    p = _densitune("run", str(METHOD_COMPARISON), "--out", str(out), "--data-root", str(root), cwd=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "data set cifar10 is missing" in lines[0] and "DATA_ROOT/cifar-10-batches-py/" in lines[0]
    assert not (out / "models").exists() and not (out / "results").exists()


def test_missing_ood_set_names_the_odin_layout(tmp_path):
    """The ID set is there (the embedded digits), the image-folder OOD sets are not: the line names their layout."""
    from dataclasses import replace

    s = st.load_study(ROOT / "experiments" / "gmm_vs_kde.yaml")
    s = replace(s, parts=(replace(s.parts[0], dataset="digits"),))
    with pytest.raises(st.DensituneError, match=r"data set tiny-imagenet-val is missing \(expected DATA_ROOT/tiny-imagenet-val/"):
        st.check_study_data(s, str(tmp_path))
    s = replace(s, parts=(replace(s.parts[0], search={**s.parts[0].search, "val_ood": "noise-uniform"}),))
    with pytest.raises(st.DensituneError, match=r"data set svhn is missing \(expected DATA_ROOT/test_32x32.mat"):
        st.check_study_data(s, str(tmp_path))


# ----------------------------------------------------------------------------- smoke runs (slow tier)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> Path:
    """Every spec with --smoke, in one run folder (networks shared across specs are trained once)."""
    out = tmp_path_factory.mktemp("study") / "run"
    p = _densitune("run", *map(str, SPECS), "--smoke", "--out", str(out), "--num-cpus", "2", "-q",
                   cwd=out.parent, timeout=1800)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.process
def test_smoke_trains_each_shared_network_once(smoke_run):
    from densitune.search.models import list_models

    studies = [st.load_study(p, smoke_run=True) for p in SPECS]
    keys = {c.key for s in studies for c in st.all_train_configs(s)}
    models = list_models(smoke_run / "models")
    assert sorted(m["key"] for m in models) == sorted(keys)  # one network per distinct config, all specs together


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.parametrize("spec", SPECS, ids=[p.stem for p in SPECS])
def test_smoke_report_puts_the_notes_figures_beside_ours(smoke_run, spec):
    s = st.load_study(spec, smoke_run=True)
    folder = smoke_run / "studies" / s.label
    text = (folder / "report.md").read_text()
    with open(folder / "report.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    note_cells = [(t.id, m, ood, c, v) for t in s.tables for m, ood, fig in t.rows for c, v in zip(t.columns, fig)]
    assert len(rows) == len(note_cells)  # one line per figure of the note
    for row, (_, method, ood, column, value) in zip(rows, note_cells):
        assert (row["method"], row["metric"], float(row["note"])) == (method, column, value)
        assert row["ood"].split(" ")[0] == ood
        ours = float(row["ours"])  # every cell measured
        assert 0 <= ours <= 1
        assert float(row["diff"]) == pytest.approx(ours - value, abs=1e-4)
        assert f"{value:.4f}" in text


@pytest.mark.slow
@pytest.mark.process
def test_a_second_run_trains_nothing_and_reports_the_same(smoke_run):
    spec = ROOT / "experiments" / "diff_score.yaml"
    report = smoke_run / "studies" / "diff-score-smoke" / "report.csv"
    before, models = report.read_text(), sorted((smoke_run / "models" / "note").iterdir())
    p = _densitune("run", str(spec), "--smoke", "--out", str(smoke_run), "--num-cpus", "2", cwd=smoke_run.parent, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "densitune train" not in p.stdout  # every network was there: no training started
    assert sorted((smoke_run / "models" / "note").iterdir()) == models
    assert report.read_text() == before


def test_a_part_searches_exactly_its_networks_in_the_run_store(tmp_path):
    """model_groups: exactly a part's networks, each member's checkpoint the run store's own folder for it
    (no view, no links: the search cache entries are those of the real weights, shared by studies)."""
    from densitune.search.cache import checkpoint_token

    s = st.load_study(METHOD_COMPARISON, smoke_run=True)
    part = s.parts[0]
    store = tmp_path / "run" / "models"
    for c in st.train_configs(s, part):
        d = store / st.TRAIN_EXPERIMENT / c.key
        d.mkdir(parents=True)
        (d / "model.pt").write_bytes(b"weights " + c.key.encode())
        (d / "config.json").write_text("{}")
    (store / st.TRAIN_EXPERIMENT / "cnn-D8-ce-s0-00000000").mkdir()  # another study's network: not searched
    groups = st.model_groups(s, part, models=store)
    keys = sorted(c.key for c in st.train_configs(s, part))
    checkpoints = [cp for g in groups for cp in g.checkpoints]
    assert sorted(os.path.basename(cp) for cp in checkpoints) == keys
    for g in groups:
        assert list(g.seeds) == sorted(g.seeds) and len(g.checkpoints) == len(g.seeds)
    for key in keys:
        cp = next(cp for cp in checkpoints if cp.endswith(key))
        assert cp == str(store / st.TRAIN_EXPERIMENT / key)
        assert checkpoint_token(cp) == checkpoint_token(str(store / st.TRAIN_EXPERIMENT / key))
