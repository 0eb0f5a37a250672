"""Every score, density and attack through a real Ray Tune search, and the note's comparison table."""

from __future__ import annotations

import pytest

from densitune.cli import main
from densitune.results.store import read_results, write_spec
from densitune.search.models import discover, select
from densitune.search.ood.densities import DENSITIES
from densitune.search.ood.scores import SCORES
from densitune.search.report.tables import report
from densitune.search.space import grid_points
from densitune.search.spec import SearchSpec
from densitune.search.tune import SearchRun, run_search

pytestmark = pytest.mark.ray

DENSITY_NAMES = tuple(DENSITIES.names())
#: scores fitted on training features through their own model of the same name
FITTED = ("knn", "rmd", "vim")


@pytest.fixture(scope="module")
def all_methods(ray_session, trained_models, tmp_path_factory):
    groups = select(discover(trained_models), (8,))  # 2 seeds: the ensemble has members
    spec = SearchSpec(
        experiment="m", val_ood="digits-blend", test_ood=("noise-uniform",), densities=DENSITY_NAMES,
        scores=tuple(SCORES.names()), eps_grid=(0.0, 0.01), eval_limit=60, attacks=("fgsm", "bim", "pgd"),
        attack_eps=0.1, attack_steps=3, density_params={"kde": {"bandwidth": ["scott", 1.0]}, "knn": {"k": [5, 50]}},
    )
    out = tmp_path_factory.mktemp("methods")
    run = SearchRun(results_dir=str(out / "results"), storage_path=str(out / "tune"))
    write_spec(run.results_dir, spec.experiment, spec.to_dict())
    grid = run_search(spec, groups, run, verbose=0)
    assert all(r.error is None for r in grid)
    return spec, groups, read_results(run.results_dir).to_pylist(), read_results(run.results_dir), run.results_dir


def test_each_grid_point_once_with_every_score(all_methods):
    spec, groups, rows, *_ = all_methods
    points = grid_points(spec, groups)
    # density, diff: 4 density variants (gmm_sum, gmm_max, kde x 2 bandwidths); diff only at eps > 0;
    # msp, entropy, gradnorm, 2 ensembles, energy, rmd, vim once, knn twice (k = 5, 50)
    assert len(points) == 4 * 2 + 4 * 1 + 5 * 2 + 5 * 2
    assert len({r["trial_id"] for r in rows}) == len(points)
    assert {r["score"] for r in rows} == set(SCORES.names())
    assert {r["density"] for r in rows if r["score"] in ("density", "diff")} == set(DENSITY_NAMES)
    assert {r["density"] for r in rows if r["score"] in FITTED} == set(FITTED)
    assert all(r["density"] == r["score"] for r in rows if r["score"] in FITTED)
    assert {r["density_params"] for r in rows if r["score"] == "knn"} == {
        '{"chunk_size": null, "k": 5}', '{"chunk_size": null, "k": 50}'}
    assert {r["density"] for r in rows if r["score"] not in ("density", "diff", *FITTED)} == {""}
    assert all(r["eps"] > 0 for r in rows if r["score"] == "diff")


def test_row_counts_per_score(all_methods):
    _, _, rows, *_ = all_methods
    by_trial = {}
    for r in rows:
        by_trial.setdefault(r["trial_id"], []).append(r)
    for trial in by_trial.values():
        score = trial[0]["score"]
        if score.startswith("ensemble"):
            # one member (both seeds together): val + 1 test OOD set, no attack rows
            assert len(trial) == 2 and {r["seed"] for r in trial} == {None}
        else:
            # 2 seeds x (val + 1 test OOD set + 3 attacks)
            assert len(trial) == 2 * 5
            assert {r["ood_dataset"] for r in trial} == {"digits-blend", "noise-uniform", "adv-fgsm", "adv-bim", "adv-pgd"}


def test_report_method_comparison(all_methods):
    *_, table, _ = all_methods
    text = report(table, view="methods")
    for name in ("| baseline (msp) |", "| ensemble |", "| ddu |", "| ddu+ip |", "| gradnorm |", "| gradnorm+ip |",
                 "| diff:gmm_sum+ip |", "| density:kde (bandwidth=1.0) |", "| energy |", "| energy+ip |", "| rmd |",
                 "| vim+ip |", "| knn (k=5) |", "| knn+ip |"):
        assert name in text, name
    assert "adv-pgd" in text


def test_report_by_latex_best_where_and_query(all_methods, capsys):
    *_, results = all_methods
    assert main(["report", results, "--by", "backbone,D", "--format", "latex"]) == 0
    out = capsys.readouterr().out
    assert out.count(r"\begin{tabular}") == 1 and "cnn & 8 &" in out and r"\toprule" in out
    assert main(["best", results, "--where", "density = 'kde'", "--json"]) == 0
    import json

    best = json.loads(capsys.readouterr().out)
    assert best["density"] == "kde" and best["score"] in ("density", "diff")
    assert main(["query", results, "SELECT count(DISTINCT trial_id) AS n FROM results", "--format", "csv"]) == 0
    assert capsys.readouterr().out.strip().splitlines() == ["n", "32"]  # tidy: no prose title column
    assert main(["report", results, "--format", "json", "--view", "configs", "--top", "2"]) == 0
    records = json.loads(capsys.readouterr().out)  # one record per row, each carrying its configuration's rank
    assert {r["rank"] for r in records} == {1, 2} and all(isinstance(r["density_params"], dict) for r in records)


def test_plot_command_writes_three_kinds(all_methods, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    *_, results = all_methods
    assert main(["plot", results, "--out", str(tmp_path / "figs")]) == 0
    paths = [p for p in capsys.readouterr().out.split() if p.endswith(".png")]
    names = {p.rsplit("/", 1)[-1] for p in paths}
    assert "auroc_vs_eps.png" in names and "roc_best.png" in names and any(n.startswith("hist_") for n in names)
    for p in paths:
        img = np.asarray(Image.open(p).convert("L"), dtype=float)
        assert img.shape[0] > 200 and img.shape[1] > 200 and img.std() > 1.0
