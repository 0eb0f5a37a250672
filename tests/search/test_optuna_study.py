"""The search's trials mirrored into an Optuna journal study in the run: optuna.load_study sees every trial
with its real parameters and its objective, for a grid and for TPE, and after a resume."""

from __future__ import annotations

import json

import optuna
import pytest

from densitune.results.store import read_results
from densitune.search.models import discover, select
from densitune.search.optuna_study import journal_path, open_storage
from densitune.search.spec import SearchSpec
from densitune.search.tune import SearchRun, run_search

pytestmark = pytest.mark.ray


def _study(results_dir, name):
    return optuna.load_study(study_name=name, storage=open_storage(journal_path(results_dir, name)))


def _by_trial(rows):
    """trial_id -> (objective, first row) from the Parquet record."""
    return {r["trial_id"]: (r["objective"], r) for r in rows}


@pytest.mark.parametrize("sampler", ["grid", "tpe"])
def test_load_study_sees_every_trial_with_its_parameters(ray_session, trained_models, tmp_path, sampler):
    groups = select(discover(trained_models), (8,))  # one group, seeds 0 and 1
    sp = SearchSpec(experiment=f"o-{sampler}", val_ood="digits-blend", test_ood=("noise-uniform",), eval_limit=60,
                    scores=("density", "msp", "ensemble_msp"), densities=("gmm_sum", "kde"), eps_grid=(0.0, 0.01),
                    sampler=sampler, num_samples=6 if sampler == "tpe" else None, eps_range=(1e-3, 0.05))
    run = SearchRun(results_dir=str(tmp_path / "results"), storage_path=str(tmp_path / "tune"))
    run_search(sp, groups, run)
    record = _by_trial(read_results(run.results_dir, experiment=sp.experiment).to_pylist())
    study = _study(run.results_dir, sp.experiment)
    trials = study.get_trials()
    assert len(trials) == len(record) == (6 if sampler == "tpe" else 2 * 2 + 2 + 2)  # density x 2 densities, msp, ens
    assert {t.user_attrs["trial_id"] for t in trials} == set(record)
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE
    for t in trials:
        objective, row = record[t.user_attrs["trial_id"]]
        assert t.state == optuna.trial.TrialState.COMPLETE and t.value == pytest.approx(objective, abs=0)
        assert "point" not in t.params and t.params["score"] == row["score"]
        assert t.params.get("model", t.params.get("ensemble_model")) == groups[0].key
        assert t.params.get("density", "") == row["density"]
        assert t.params.get("eps", 0.0) == pytest.approx(row["eps"], abs=0)
        if sampler == "grid":
            assert t.params["eps"] in (0.0, 0.01)
    best = max(record.values(), key=lambda v: v[0])[0]
    assert study.best_value == pytest.approx(best, abs=0)


def test_a_resumed_search_fills_the_study_from_the_results(ray_session, trained_models, tmp_path):
    groups = select(discover(trained_models), (4,))
    sp = SearchSpec(experiment="o-resume", val_ood="digits-blend", test_ood=("noise-uniform",), eval_limit=60,
                    eps_grid=(0.0, 0.01, 0.02))
    run = SearchRun(results_dir=str(tmp_path / "results"), storage_path=str(tmp_path / "tune"))
    run_search(sp, groups, run)
    (journal_path(run.results_dir, sp.experiment) / "journal.log").unlink()  # the mirror lost (e.g. killed before a callback wrote it)
    assert run_search(sp, groups, run, resume=True) is None  # nothing left to run
    trials = _study(run.results_dir, sp.experiment).get_trials()
    assert sorted(t.params["eps"] for t in trials) == [0.0, 0.01, 0.02]
    rows = read_results(run.results_dir, experiment=sp.experiment).to_pylist()
    assert {t.user_attrs["trial_id"] for t in trials} == {r["trial_id"] for r in rows}
    assert all(json.loads(r["search_params"])["point"] == t.user_attrs["label"]
               for t in trials for r in rows if r["trial_id"] == t.user_attrs["trial_id"])
