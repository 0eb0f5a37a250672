"""Figures from a real (Ray-free) search: readable PNGs, re-evaluated scores that match the rows, clear errors."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densitune.errors import CheckpointError, ConfigError, ResultsError
from densitune.results.rows import provenance
from densitune.results.store import (
    SPEC_FILE,
    experiment_dir,
    read_results,
    read_spec,
    write_rows,
    write_spec,
)
from densitune.search.evaluate import Workspace
from densitune.search.models import discover, select
from densitune.search.ood.metrics import auroc
from densitune.search.report.plots import best_scores, eps_curves, plot_results
from densitune.search.report.tables import search_frame
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial

TEST_OOD = ("noise-uniform", "digits-rot90")


@pytest.fixture(scope="module")
def ws() -> Workspace:
    return Workspace()


@pytest.fixture(scope="module")
def results(trained_models, tmp_path_factory, ws):
    """gmm_sum density at ε ∈ {0, 0.01} on cnn D=8 (seeds 0, 1) and cnn D=4 (seed 0): 4 trials."""
    root = tmp_path_factory.mktemp("plot-results")
    spec = SearchSpec(experiment="p", val_ood="digits-blend", test_ood=TEST_OOD, eps_grid=(0.0, 0.01), eval_limit=80)
    write_spec(root, spec.experiment, spec.to_dict())
    for group in select(discover(trained_models), (8, 4)):
        for eps in spec.eps_grid:
            trial_id = f"{group.key}-eps{eps:g}"
            params = TrialParams(group.key, "density", "gmm_sum", eps)
            _, rows = run_trial(ws, spec, group, params, trial_id)
            write_rows(root, rows, name=trial_id)
    return root


def _copy_without_spec(results, dst):
    shutil.copytree(results, dst)
    (experiment_dir(dst, "p") / SPEC_FILE).unlink()
    return dst


def _assert_readable(path):
    img = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    h, w, _ = img.shape
    assert w > 200 and h > 200
    assert img.std() > 0  # not one flat colour


def test_plot_results_writes_every_figure(results, tmp_path, ws):
    out = tmp_path / "figs"
    paths = plot_results(results, out, ws=ws)
    names = sorted(p.name for p in paths)
    assert names == sorted(["auroc_vs_eps.png", "roc_best.png", *(f"hist_{o}.png" for o in TEST_OOD)])
    assert sorted(p.name for p in out.iterdir()) == names
    assert len([n for n in names if n.startswith("hist_")]) == len(TEST_OOD)
    for p in paths:
        _assert_readable(p)


def test_rescored_best_config_reproduces_its_rows(results, ws):
    """The raw scores behind histograms and ROC give the AUROC the search recorded for that model."""
    df = search_frame(read_results(results))
    best = best_scores(results, df, "auroc", ws)
    assert best.ood_sets == list(TEST_OOD)
    assert best.plain is not None and best.ip is not None and best.ip_eps == 0.01
    cfg = best.result.config
    for trial, arrays in ((best.result.plain, best.plain), (best.result.ip, best.ip)):
        rows = df[(df["trial_id"] == trial["trial_id"]) & (df["split"] == "test")]
        seed = rows["seed"].min()  # single-model score: the first seed's checkpoint
        assert f"seed {int(seed)}" in best.members
        for ood in TEST_OOD:
            (want,) = rows[(rows["seed"] == seed) & (rows["ood_dataset"] == ood)]["auroc"]
            assert auroc(arrays["id"], arrays[ood]) == pytest.approx(want, abs=1e-12)
            assert arrays["id"].shape == (80,) and arrays[ood].shape == (80,)
    assert cfg["score"] == "density" and cfg["density"] == "gmm_sum"


def test_missing_spec_fails_before_writing(results, tmp_path):
    bare = _copy_without_spec(results, tmp_path / "bare")
    out = tmp_path / "figs"
    with pytest.raises(ResultsError, match="no _spec.json for experiment 'p': histograms"):
        plot_results(bare, out)
    assert not out.exists()  # nothing is half-written
    # The ε plot needs only the rows: asked for alone, it is written.
    paths = plot_results(bare, out, scores=False, metric="fpr95")
    assert [p.name for p in paths] == ["fpr95_vs_eps.png"]
    _assert_readable(paths[0])


def test_missing_checkpoint_is_named(results, tmp_path):
    moved = tmp_path / "moved"
    table = read_results(results)
    rows = [{**r, "checkpoints": [str(tmp_path / "gone" / Path(c).name) for c in r["checkpoints"]]}
            for r in table.to_pylist()]
    for r in rows:
        del r["schema_version"]  # to_table sets it
    write_rows(moved, rows, name="all")
    write_spec(moved, "p", read_spec(results, "p"))
    with pytest.raises(CheckpointError, match=r"checkpoint .*gone.* no longer exists"):
        plot_results(moved, tmp_path / "figs")


def test_no_search_rows_and_unknown_experiment(results, tmp_path):
    train_only = tmp_path / "train-only"
    row = dict(experiment="t", trial_id="x", stage="train", epoch=1, train_loss=0.5,
               started_at=datetime(2026, 1, 1, tzinfo=UTC), **provenance("cpu"))
    write_rows(train_only, [row])
    with pytest.raises(ResultsError, match="no search rows"):
        plot_results(train_only, tmp_path / "a")
    with pytest.raises(ResultsError, match="no search rows for experiment 'q'; the results hold: p"):
        plot_results(results, tmp_path / "b", experiment="q")
    with pytest.raises(ConfigError, match="inside the results directory"):
        plot_results(results, results / "plots", scores=False)  # PNGs there would break read_results
    assert not (results / "plots").exists()


def test_eps_curves_average_seeds_then_ood_sets(results):
    df = search_frame(read_results(results))
    curves = eps_curves(df, "auroc")
    # 2 configurations (D=4, D=8) x 2 ε, no attacks
    assert len(curves) == 4 and set(curves.columns) >= {"D", "density", "eps", "val", "test"} and "adv" not in curves
    d8 = df[(df["D"] == 8) & (df["eps"] == 0.01)]
    row = curves[(curves["D"] == 8) & (curves["eps"] == 0.01)].iloc[0]
    assert row["val"] == pytest.approx(d8[d8["split"] == "val"]["auroc"].mean())
    per_set = d8[d8["split"] == "test"].groupby("ood_dataset")["auroc"].mean()
    assert row["test"] == pytest.approx(per_set.mean())


def test_histogram_and_roc_take_far_and_infinite_scores():
    """Log-densities of -1e5 or -inf do not squash the histogram and are counted; the ROC accepts them."""
    from densitune.search.report.plots import BestScores, hist_figure, roc_figure
    from densitune.search.report.tables import ConfigResult

    cfg = dict(backbone="cnn", D=8, loss="ce", center_loss=None, spectral=True,
               score="density", density="gmm_sum", density_params="{}")
    rng = np.random.default_rng(0)
    s_id = rng.normal(-5, 1, 300)
    s_ood = np.concatenate([rng.normal(-8, 2, 200), np.full(30, -1e5), np.full(20, -np.inf)])
    best = BestScores(ConfigResult(cfg, None, None, 0.9), "seed 0", {"id": s_id, "far": s_ood}, None)
    fig = hist_figure(best, "far")
    ax = fig.axes[0]
    assert ax.get_xlim()[0] > -30  # the axis follows the ID scores, not -1e5
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1].startswith("far (n=250; 50 below the axis")
    assert f"AUROC {auroc(s_id, s_ood):.3f}" in ax.get_title()
    roc = roc_figure(best).axes[0]
    (curve, _chance) = roc.get_lines()
    fpr, tpr = curve.get_data()
    assert fpr[0] == 0 and tpr[-1] == 1 and np.all(np.diff(fpr) >= 0)
    # area under the drawn curve = the rank AUROC of densitune.search.ood.metrics
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s_id, s_ood))


def test_where_selects_the_rescored_configuration_in_every_format(results, tmp_path, ws):
    """--where picks what is drawn: the histograms and ROC show the best of the selected rows (here D=4, the worse one)."""
    import xml.etree.ElementTree as ET

    out = tmp_path / "d4"
    paths = plot_results(results, out, ws=ws, where="D = 4", formats=["svg", "pdf", "png"])
    stems = ["auroc_vs_eps", "roc_best", *(f"hist_{o}" for o in TEST_OOD)]
    assert sorted(p.name for p in paths) == sorted(f"{s}.{f}" for s in stems for f in ("svg", "pdf", "png"))
    assert all(p.stat().st_size > 1000 for p in paths)

    def texts(name):
        return " ".join("".join(e.itertext()) for e in ET.parse(out / name).getroot().iter() if e.tag.endswith("}text"))

    for name in ("roc_best.svg", *(f"hist_{o}.svg" for o in TEST_OOD)):
        assert "cnn D=4 ce" in texts(name) and "D=8" not in texts(name), name
    eps = texts("auroc_vs_eps.svg")
    assert "D=4 gmm_sum" in eps and "D=8" not in eps
    # the AUROC printed on the ROC legend is the D=4 trial's recorded one
    df = search_frame(read_results(results))
    want = df[(df["D"] == 4) & (df["eps"] == 0) & (df["split"] == "test") & (df["ood_dataset"] == TEST_OOD[0])]["auroc"]
    assert f"{TEST_OOD[0]}, no ip: AUROC {want.iloc[0]:.3f}" in texts("roc_best.svg")
