"""The search: real Ray Tune + Optuna runs, exact row counts, and no test data in the objective."""

from __future__ import annotations

import collections
import json

import pyarrow.parquet as pq
import pytest
import torch

from densitune.errors import ConfigError, UnknownNameError
from densitune.results.store import read_results
from densitune.search.evaluate import Workspace, selection_metrics
from densitune.search.models import discover, select
from densitune.search.space import TrialParams
from densitune.search.spec import SearchSpec
from densitune.search.trial import run_trial
from densitune.search.tune import SearchRun, run_search, trial_budget

TEST_OOD = ("digits-rot90", "noise-uniform")


def spec(**kw) -> SearchSpec:
    base = dict(experiment="s", val_ood="digits-blend", test_ood=TEST_OOD, eps_grid=(0.0, 0.01), eval_limit=120)
    return SearchSpec(**{**base, **kw})


@pytest.mark.ray
def test_two_trial_search_writes_exact_rows(ray_session, trained_models, tmp_path):
    groups = select(discover(trained_models), (8,))  # cnn D=8 with seeds 0 and 1
    sp = spec()
    assert trial_budget(sp, groups) == 2
    run = SearchRun(results_dir=str(tmp_path / "results"), storage_path=str(tmp_path / "tune"))
    grid = run_search(sp, groups, run, verbose=0)
    assert [r.error for r in grid] == [None, None]
    table = read_results(run.results_dir)
    # 2 trials x 2 seeds x (1 validation OOD set + 2 test OOD sets)
    assert table.num_rows == 2 * 2 * 3
    rows = table.to_pylist()
    assert len({r["trial_id"] for r in rows}) == 2
    assert sorted({r["eps"] for r in rows}) == [0.0, 0.01]
    assert sum(r["split"] == "val" for r in rows) == 4
    assert {r["ood_dataset"] for r in rows if r["split"] == "test"} == set(TEST_OOD)
    assert {r["ood_dataset"] for r in rows if r["split"] == "val"} == {"digits-blend"}
    for r in rows:
        assert r["protocol"] == "val-ood:digits-blend" and r["code_version"].startswith("densitune")
        assert r["seed"] in (0, 1) and r["D"] == 8 and 0.0 <= r["auroc"] <= 1.0
        # schema v4 provenance, filled on every row (a Ray trial records its Ray node)
        assert r["node"].startswith("ray:") and r["device"] == "cpu" and r["dtype"] == "float32"
        assert r["autocast"] is False and r["compile"] is False and r["ensemble"] is False
        assert r["torch_version"] == torch.__version__ and r["densitune_version"]
        assert r["checkpoints"] == [groups[0].checkpoints[groups[0].seeds.index(r["seed"])]]
        ood_split = f"{r['ood_dataset']}/{r['split']}"
        assert set(json.loads(r["data_checksums"])) == {"digits/train", f"digits/{r['split']}", ood_split}
    # the same split has the same checksum in every row (trials and seeds share the data)
    sums = collections.defaultdict(set)
    for r in rows:
        for k, v in json.loads(r["data_checksums"]).items():
            sums[k].add(v)
    assert all(len(v) == 1 for v in sums.values()) and len(sums) == 4 + len(TEST_OOD)
    # every file is plain Parquet that pyarrow reads on its own
    for f in (tmp_path / "results").rglob("*.parquet"):
        assert pq.read_table(f).num_rows == 6


def test_selection_never_loads_test_data(trained_models):
    (group,) = select(discover(trained_models), (4,))
    ws = Workspace()
    selection_metrics(ws, spec(), [group.checkpoints[0]], TrialParams(group.key, "density", "gmm_sum", eps=0.01))
    loaded = {(k.name, k.split) for k in ws.loaded_data()}  # every data set the objective touched
    assert loaded == {("digits", "train"), ("digits", "val"), ("digits-blend", "val")}


def test_objective_independent_of_test_sets(trained_models):
    (group,) = select(discover(trained_models), (4,))
    params = TrialParams(group.key, "density", "gmm_sum", eps=0.01)
    obj_a, rows_a = run_trial(Workspace(), spec(test_ood=("digits-rot90",)), group, params, "a")
    obj_b, rows_b = run_trial(Workspace(), spec(test_ood=("photo-patches", "noise-uniform")), group, params, "b")
    assert obj_a == obj_b  # swapping every test set changes nothing the sampler sees
    val_a = [r for r in rows_a if r["split"] == "val"]
    val_b = [r for r in rows_b if r["split"] == "val"]
    assert [r["auroc"] for r in val_a] == [r["auroc"] for r in val_b]


def test_same_config_same_numbers(trained_models):
    (group,) = select(discover(trained_models), (4,))
    params = TrialParams(group.key, "density", "gmm_sum", eps=0.02)
    _, a = run_trial(Workspace(), spec(), group, params, "x")
    _, b = run_trial(Workspace(), spec(), group, params, "x")
    key = lambda r: (r["ood_dataset"], r["split"])  # noqa: E731
    assert [(key(r), r["auroc"], r["auprc"], r["fpr95"]) for r in a] == [(key(r), r["auroc"], r["auprc"], r["fpr95"]) for r in b]


def test_features_and_fits_are_cached(trained_models):
    (group,) = select(discover(trained_models), (4,))
    ws = Workspace()
    for eps in (0.0, 0.005, 0.01):
        run_trial(ws, spec(), group, TrialParams(group.key, "density", "gmm_sum", eps=eps), f"t{eps}")
    # train, ID val, ID test, val OOD, 2 test OOD: each extracted once; one density fit
    assert ws.counts["extract"] == 6 and ws.counts["fit"] == 1 and ws.counts["load_model"] == 1


def test_spec_rejects_bad_input():
    with pytest.raises(ConfigError, match="eps must be"):
        spec(eps_grid=(0.0, -0.1))
    with pytest.raises(ConfigError, match="also a test OOD set"):
        spec(val_ood="digits-rot90")
    with pytest.raises(UnknownNameError, match="unknown density 'gmm_prod'"):
        spec(densities=("gmm_prod",))
    with pytest.raises(ConfigError, match="D must be > 0"):
        spec(dims=(0,))
    with pytest.raises(ConfigError, match="unknown sampler"):
        spec(sampler="random")


def test_rows_record_the_fitted_density(trained_models):
    import json

    (group,) = select(discover(trained_models), (4,))
    _, rows = run_trial(Workspace(), spec(densities=("kde",)), group, TrialParams(group.key, "density", "kde", eps=0.0), "k")
    params = json.loads(rows[0]["density_params"])
    fit = json.loads(rows[0]["density_fit"])
    assert params["bandwidth"] == "scott" and fit["bandwidth_"] > 0 and fit["n_train_"] == 1078
    _, rows = run_trial(Workspace(), spec(), group, TrialParams(group.key, "msp", eps=0.0), "m")
    assert {r["density_fit"] for r in rows} == {None} and {r["density_params"] for r in rows} == {"{}"}
