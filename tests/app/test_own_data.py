"""A researcher's own data (issue 26), in real processes: a run that holds several search experiments,
and what the readers (`best`, `export`, `plot`, `compare`) take from it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from densitune.results.store import read_results


def densitune(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "densitune", *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def search(run: Path, experiment: str, *extra: str) -> subprocess.CompletedProcess:
    s = densitune("search", "--out", str(run), "--experiment", experiment, "--num-cpus", "2",
                  "--test-ood", "noise-uniform", "--eval-limit", "60", "-q", *extra)
    assert s.returncode == 0, s.stderr[-3000:]
    return s


def best_val(run: Path, experiment: str | None = None) -> tuple[str, float]:
    """(experiment, validation AUROC) of the best validation row, read from the Parquet itself."""
    t = read_results(run / "results", stage="search", columns=("experiment", "split", "auroc", "trial_id"))
    t = t.filter(pc.equal(t["split"], "val"))
    if experiment is not None:
        t = t.filter(pc.equal(t["experiment"], experiment))
    i = pc.index(t["auroc"], pc.max(t["auroc"])).as_py()
    return t["experiment"][i].as_py(), t["auroc"][i].as_py()


@pytest.fixture(scope="module")
def two_experiments(tmp_path_factory, trained_models) -> Path:
    """A run folder holding the session's three networks (cnn D=8 seeds 0, 1; D=4 seed 0) and two search
    experiments over the D=8 ones: `older` (density: gmm_sum, kde), then `newer` (msp, entropy)."""
    run = tmp_path_factory.mktemp("two") / "run"
    shutil.copytree(trained_models, run / "models")
    search(run, "older", "-D", "8", "--score", "density", "--density", "gmm_sum", "kde", "--eps-grid", "0",
           "--keep-scores", "all")
    search(run, "newer", "-D", "8", "--score", "msp", "entropy", "--eps-grid", "0", "--keep-scores", "all")
    return run


@pytest.mark.process
def test_best_takes_the_newest_experiment_and_says_so_on_stderr(two_experiments):
    run = two_experiments
    b = densitune("best", str(run), "--json")
    assert b.returncode == 0, b.stderr[-2000:]
    cfg = json.loads(b.stdout)  # stdout stays one valid JSON object: the note is on stderr only
    assert cfg["experiment"] == "newer" and cfg["score"] in {"msp", "entropy"}
    lines = b.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 search experiments" in lines[0] and "using the newest, 'newer'" in lines[0]
    assert "also: older" in lines[0] and "--all-experiments" in lines[0]

    # --experiment takes another; --where naming the column chooses too; neither says anything
    o = densitune("best", str(run), "--json", "--experiment", "older")
    assert o.returncode == 0 and o.stderr == "" and json.loads(o.stdout)["experiment"] == "older"
    assert json.loads(o.stdout)["score"] == "density"
    w = densitune("best", str(run), "--json", "--where", "experiment = 'older'")
    assert w.returncode == 0 and w.stderr == "" and json.loads(w.stdout) == json.loads(o.stdout)
    # --all-experiments ranks across both: the experiment of the best validation row of all
    a = densitune("best", str(run), "--json", "--all-experiments")
    assert a.returncode == 0 and a.stderr == "" and json.loads(a.stdout)["experiment"] == best_val(run)[0]
    # csv stays machine-readable too: the note is not in it
    c = densitune("best", str(run), "--format", "csv")
    assert c.returncode == 0 and "newest" not in c.stdout and "newer" in c.stdout and "older" not in c.stdout
    # an unknown experiment, or both flags: one line, exit 2
    u = densitune("best", str(run), "--experiment", "nosuch")
    assert u.returncode == 2 and u.stderr.strip().splitlines() == [
        f"densitune: error: no search experiment 'nosuch' in {run / 'results'} (search experiments: 'older', 'newer')"]
    x = densitune("best", str(run), "--experiment", "older", "--all-experiments")
    assert x.returncode == 2 and "not allowed with argument" in x.stderr


@pytest.mark.slow
@pytest.mark.process
def test_export_plot_and_compare_take_the_newest_experiment(two_experiments, tmp_path):
    run = two_experiments
    e = densitune("export", str(run), str(tmp_path / "det"))
    assert e.returncode == 0, e.stderr[-2000:]
    manifest = json.loads((tmp_path / "det" / "detector.json").read_text())
    assert manifest["score"] in {"msp", "entropy"} and "using the newest, 'newer'" in e.stderr
    e2 = densitune("export", str(run), str(tmp_path / "det2"), "--experiment", "older")
    assert e2.returncode == 0 and json.loads((tmp_path / "det2" / "detector.json").read_text())["score"] == "density"

    p = densitune("plot", str(run), "--no-scores", "--out", str(tmp_path / "plots"), "--format", "svg")
    assert p.returncode == 0, p.stderr[-2000:]
    svg = (tmp_path / "plots" / "auroc_vs_eps.svg").read_text()  # SVG keeps text as text: the title names the experiment
    assert "using the newest, 'newer'" in p.stderr and "newer" in svg and "older" not in svg

    c = densitune("compare", str(run), "--a", "score = 'msp'", "--b", "score = 'entropy'", "--format", "json")
    assert c.returncode == 0, c.stderr[-2000:]
    assert json.loads(c.stdout) and "using the newest, 'newer'" in c.stderr
    # the older experiment has no msp rows: compare confined to it finds nothing for A
    c2 = densitune("compare", str(run), "--a", "score = 'msp'", "--b", "density = 'kde'", "--experiment", "older")
    assert c2.returncode == 2 and "msp" in c2.stderr


@pytest.mark.process
def test_progress_line_counts_tunes_running_trials(tmp_path, trained_models):
    """On 2 CPUs two trials run at once: every redraw of the bar while trials are left says so (issue 26, item 6).
    12 trials (2 model groups x 3 densities x ε in {0, 0.01}): the bar redraws after every finished trial."""
    s = densitune("search", "--out", str(tmp_path / "run"), "--models", str(trained_models / "t"), "--num-cpus", "2",
                  "--density", "gmm_sum", "gmm_max", "kde", "--eps-grid", "0", "0.01", "--test-ood", "noise-uniform",
                  "--eval-limit", "40")
    assert s.returncode == 0, s.stderr[-3000:]
    drawn = [(int(n), int(total), int(running))
             for n, total, running in re.findall(r"(\d+)/(\d+) done, (\d+) running", s.stderr)]
    assert drawn[-1][:2] == (12, 12), drawn
    middle = [d for d in drawn if 0 < d[0] < 12]
    assert len(middle) >= 6, drawn  # redrawn as trials finish
    # Tune's RUNNING trials once the pool is refilled: both CPUs busy while two or more trials are left
    assert [r for n, _, r in middle] == [min(2, 12 - n) for n, _, _ in middle], drawn


@pytest.mark.process
def test_list_models_shows_accuracies_epochs_and_settings(two_experiments):
    """Per network: ID validation accuracy (its last epoch), ID test accuracy equal to the search rows'
    `id_accuracy` for that checkpoint ("—" for the D=4 network no search scored), epochs, D, loss, λ, seed, size."""
    run = two_experiments
    j = densitune("list-models", str(run), "--format", "json")
    assert j.returncode == 0, j.stderr[-2000:]
    nets = {r["key"]: r for r in json.loads(j.stdout)}
    assert len(nets) == 3
    rows = read_results(run / "results", stage="search", columns=("checkpoints", "id_accuracy", "split", "ensemble"))
    tested = {Path(r["checkpoints"][0]).name: r["id_accuracy"] for r in rows.to_pylist()
              if r["split"] == "test" and len(r["checkpoints"]) == 1}
    assert sorted(tested) == sorted(k for k, r in nets.items() if r["D"] == 8)
    for key, r in nets.items():
        meta = json.loads((run / "models" / "t" / key / "config.json").read_text())
        # JSON output keeps 15 significant digits
        assert r["val_accuracy"] == pytest.approx(meta["metrics"]["val_accuracy"], abs=1e-13) and r["epochs"] == "3/3"
        want = tested.get(key)
        assert r["test_accuracy"] == (None if want is None else pytest.approx(want, abs=1e-13))  # null: no search scored it
        assert (r["loss"], r["λ"], r["seed"]) == ("ce", None, meta["config"]["seed"])
        assert r["size_mb"] == round((run / "models" / "t" / key / "model.pt").stat().st_size / 1e6, 3)
    m = densitune("list-models", str(run))
    d4 = next(line for line in m.stdout.splitlines() if "cnn-D4-" in line)
    cells = [c.strip() for c in d4.strip("|").split("|")]
    header = [c.strip() for c in next(line for line in m.stdout.splitlines() if "val_accuracy" in line).strip("|").split("|")]
    shown = dict(zip(header, cells, strict=True))
    assert shown["test_accuracy"] == "—" and shown["λ"] == "—"
    assert shown["val_accuracy"] == f"{nets[shown['key']]['val_accuracy']:.4f}"


def image_folder(path: Path, n: int, fmt: str, mode: str, seed: int) -> Path:
    """``n`` real 28x28 image files of one format (PNG grayscale, JPEG colour...) under ``path``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True)
    for i in range(n):
        shape = (28, 28) if mode == "L" else (28, 28, 3)
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(path / f"img{i:03d}.{fmt}")
    return path


@pytest.mark.process
def test_named_folder_sets_are_grouped_by_kind_under_their_short_names(tmp_path, trained_models):
    """`near:NAME=folder:PATH` / `far:...` name a set and its kind; a plain `folder:` set is its folder's name
    (made unique when two collide), kind "unknown"; rows keep the full text, reports show kind: short name."""
    a = image_folder(tmp_path / "data" / "a" / "scans", 30, "png", "L", 0)
    b = image_folder(tmp_path / "data" / "b" / "scans", 30, "jpg", "RGB", 1)  # same folder name as a
    c = image_folder(tmp_path / "data" / "c" / "photos", 30, "png", "RGB", 2)
    run = tmp_path / "run"
    s = densitune("search", "--out", str(run), "--models", str(trained_models / "t"), "-D", "8", "--num-cpus", "2",
                  "--eps-grid", "0", "--eval-limit", "60", "-q",
                  "--test-ood", f"near:mine=folder:{a}", f"folder:{b}", f"folder:{c}", "noise-uniform", f"far:{c.name}2=folder:{c}")
    assert s.returncode == 0, s.stderr[-3000:]
    rows = read_results(run / "results", stage="search", columns=("ood_dataset", "ood_kind", "ood_name", "split"))
    sets = {(r["ood_dataset"], r["ood_kind"], r["ood_name"]) for r in rows.to_pylist() if r["split"] == "test" and r["ood_dataset"]}
    assert sets == {(f"near:mine=folder:{a}", "near", "mine"), (f"folder:{b}", "unknown", "scans"),
                    (f"folder:{c}", "unknown", "photos"), ("noise-uniform", "far", "noise-uniform"),
                    (f"far:photos2=folder:{c}", "far", "photos2")}
    r = densitune("report", str(run))
    assert r.returncode == 0, r.stderr[-2000:]
    header = next(line for line in r.stdout.splitlines() if line.startswith("| method"))
    columns = [c.strip() for c in header.strip("|").split("|")][3:]
    # near first, then far, then the sets of unknown kind; short names, no paths
    assert columns == ["near: mine", "far: noise-uniform", "far: photos2", "photos", "scans"]
    assert str(tmp_path) not in r.stdout.split("\n\n", 2)[1]
    full = densitune("report", str(run), "--full")  # every table: short names, never the folders' paths
    assert full.returncode == 0 and str(tmp_path / "data") not in full.stdout and "| mine " in full.stdout
    j = densitune("report", str(run), "--format", "json")
    tidy = json.loads(j.stdout)
    assert {(t["ood_group"], t["ood_name"], t["ood_dataset"]) for t in tidy} >= {("near", "mine", f"near:mine=folder:{a}")}


@pytest.mark.process
@pytest.mark.parametrize(("given", "message"), [
    ("near:my set=folder:/x", "NAME must be letters, digits"),
    ("far:x=svhn", "the named form is far:NAME=folder:PATH"),
    ("near:..=folder:/x", "NAME must be letters, digits"),
    ("near:x", "the named form is near:NAME=folder:PATH"),
])
def test_a_malformed_named_set_is_one_line_and_exit_2(given, message, tmp_path, trained_models):
    s = densitune("search", "--out", str(tmp_path / "run"), "--models", str(trained_models / "t"), "--test-ood", given)
    assert s.returncode == 2 and len(s.stderr.strip().splitlines()) == 1 and message in s.stderr, s.stderr
    assert not (tmp_path / "run" / "results").exists()


def orient_run(tmp_path: Path, models: Path, name: str, test_ood: str, *extra: str) -> dict[str, list[dict]]:
    """A real search of `diff` (gmm_sum, ε = 0.01) on the digits; its rows by score."""
    run = tmp_path / name
    s = densitune("search", "--out", str(run), "--models", str(models), "--num-cpus", "2", "--score", "diff",
                  "--eps-grid", "0.01", "--eval-limit", "80", "--test-ood", test_ood, "-q", *extra)
    assert s.returncode == 0, s.stderr[-3000:]
    out: dict[str, list[dict]] = {}
    for r in read_results(run / "results", stage="search").to_pylist():
        out.setdefault(r["score"], []).append(r)
    return out


@pytest.mark.slow
@pytest.mark.process
def test_orient_validation_adds_the_negated_diff_variant_and_reads_no_test_set(tmp_path, trained_models):
    """`--orient validation` adds `diff_neg` (= −diff, its own trial) beside each `diff` trial whose validation AUROC
    is below 0.5; `diff` stays as it is. Leakage: another test set changes nothing the decision or the variant's
    validation rows depend on. The default report marks an inverted score with † and a note under the table."""
    from densitune.search.spec import SearchSpec

    assert SearchSpec(experiment="e", val_ood=("digits-blend",), test_ood=("noise-uniform",)).orient == "none"  # opt in
    models = trained_models / "t"
    a = orient_run(tmp_path, models, "a", "noise-uniform", "--orient", "validation")
    b = orient_run(tmp_path, models, "b", "digits-hflip", "--orient", "validation")
    for rows in (a, b):
        assert set(rows) == {"diff", "diff_neg"}
        diff = {(r["trial_id"], r["split"], r["ood_dataset"], r["seed"]): r for r in rows["diff"]}
        neg = rows["diff_neg"]
        per_trial: dict[str, list[float]] = {}
        for r in rows["diff"]:
            if r["split"] == "val":  # one validation set (the digits' default): mean over seeds below 0.5
                per_trial.setdefault(r["trial_id"], []).append(r["auroc"])
        inverted = {t for t, v in per_trial.items() if sum(v) / len(v) < 0.5}
        assert {r["trial_id"] for r in neg} == {f"{t}-diff_neg" for t in inverted} and inverted
        for r in neg:  # the same scores negated: AUROC reverses exactly, still higher = more ID
            o = diff[(r["trial_id"].removesuffix("-diff_neg"), r["split"], r["ood_dataset"], r["seed"])]
            assert r["auroc"] == pytest.approx(1.0 - o["auroc"], abs=1e-12)
            assert (r["eps"], r["density"], r["checkpoints"]) == (o["eps"], o["density"], o["checkpoints"])
        for t in inverted:  # the variant ranks better on validation; diff itself keeps its sign (the rows above)
            v = [r["auroc"] for r in neg if r["trial_id"] == f"{t}-diff_neg" and r["split"] == "val"]
            assert sum(v) / len(v) == pytest.approx(1 - sum(per_trial[t]) / len(per_trial[t]), abs=1e-12)
            assert sum(v) / len(v) > 0.5
    # leakage: the test set differs (noise-uniform vs digits-hflip); what validation decided does not
    val = lambda rows: sorted((r["score"], r["checkpoints"][0], r["ood_dataset"], r["auroc"], r["objective"])  # noqa: E731
                              for s in ("diff", "diff_neg") for r in rows[s] if r["split"] == "val")
    assert val(a) == val(b)
    assert {r["ood_dataset"] for r in a["diff_neg"] if r["split"] == "test"} == {"noise-uniform"}
    assert {r["ood_dataset"] for r in b["diff_neg"] if r["split"] == "test"} == {"digits-hflip"}

    r = densitune("report", str(tmp_path / "a"))
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    marked = [line for line in lines if line.startswith("| diff:gmm_sum+ip †")]
    note = next(i for i, line in enumerate(lines) if line.startswith("† validation AUROC below 0.5"))
    assert len(marked) == 1 and lines[note - 1] == "" and lines[note - 2].startswith("| ")  # one line under the table
    assert any(line.startswith("| diff_neg:gmm_sum+ip ") and "†" not in line for line in lines)
    j = densitune("report", str(tmp_path / "a"), "--format", "json")
    assert {(t["score"], t["inverted"]) for t in json.loads(j.stdout)} == {("diff", True), ("diff_neg", False)}
    assert "†" not in j.stdout


def test_a_folder_is_one_set_named_or_not_for_the_validation_test_split():
    """Naming a folder does not make it another set: validation and test sets stay distinct by their data."""
    from densitune.errors import ConfigError
    from densitune.search.spec import SearchSpec

    for val, test in ((("near:a=folder:/x",), ("folder:/x",)), (("folder:/x",), ("far:b=folder:/x", "noise-uniform"))):
        with pytest.raises(ConfigError, match="is also a test OOD set"):
            SearchSpec(experiment="e", val_ood=val, test_ood=test)
    assert SearchSpec(experiment="e", val_ood=("folder:/y",), test_ood=("far:b=folder:/x",)).test_ood == ("far:b=folder:/x",)
